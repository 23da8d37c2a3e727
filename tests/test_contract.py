"""The written contract: sentinel verdicts, expert-map validation, router-output and received-layout checks."""

from __future__ import annotations

import pytest
import torch

from hostcore.contract import (ReceivedTokens, aligned_capacity, check_expert_map, check_received,
                               check_router_output, sentinel_verdict)
from hostcore.errors import ContractError

MAP_RANK0_OF_2 = torch.tensor([0, 1, -1, -1], dtype=torch.int32)
MAP_RANK1_OF_2 = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)


def test_vllm_fix_example_holds() -> None:
    """vLLM PR #42034's test: map [0,1,-1,-1] on rank 0 of 2 -> sentinel 2."""
    assert sentinel_verdict(2, 4, MAP_RANK0_OF_2)
    assert not sentinel_verdict(0, 4, MAP_RANK0_OF_2)


def test_negative_one_wraps_to_a_local_expert_on_the_last_rank() -> None:
    verdict = sentinel_verdict(-1, 4, MAP_RANK1_OF_2)
    assert not verdict
    assert "expert_map[3] = 1" in verdict.reason and "local expert 1" in verdict.reason


def test_out_of_range_is_fine_without_a_map_only() -> None:
    assert sentinel_verdict(4, 4, None)
    assert not sentinel_verdict(4, 4, MAP_RANK0_OF_2)
    assert "past the end" in sentinel_verdict(4, 4, MAP_RANK0_OF_2).reason
    assert not sentinel_verdict(-1, 4, None)
    assert not sentinel_verdict(3, 4, None)


def test_guard_slot_makes_e_valid() -> None:
    guarded = torch.cat([MAP_RANK0_OF_2, torch.tensor([-1], dtype=torch.int32)])
    assert sentinel_verdict(4, 4, guarded)


@pytest.mark.parametrize("table, match", [
    (torch.tensor([0, 1, -1], dtype=torch.int64), "1-D int32"),
    (torch.tensor([0, 1], dtype=torch.int32), "2 entries but the layer has 3"),
    (torch.tensor([0, -1, -1, 5], dtype=torch.int32), "guard slots"),
    (torch.tensor([0, -2, 1], dtype=torch.int32), r"found \[-2\]"),
    (torch.tensor([0, 2, -1], dtype=torch.int32), "0..L-1"),
    (torch.tensor([0, 0, -1], dtype=torch.int32), "0..L-1"),
])
def test_bad_expert_maps_are_refused(table: torch.Tensor, match: str) -> None:
    with pytest.raises(ContractError, match=match):
        check_expert_map(table, 3)


def test_aligned_capacity_bounds_every_layout() -> None:
    assert aligned_capacity(1, 8, 16) == 16
    assert aligned_capacity(100, 4, 16) == 160  # 100 + 4 * 15 = 160
    assert aligned_capacity(0, 4, 16) == 0
    with pytest.raises(ContractError):
        aligned_capacity(4, 4, 0)


def test_router_output_checks() -> None:
    h = torch.randn(3, 8)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    w = torch.rand(3, 2)
    check_router_output(h, ids, w)
    with pytest.raises(ContractError, match="bf16, fp16 or fp32"):
        check_router_output(h.double(), ids, w)
    with pytest.raises(ContractError, match="int32 or int64"):
        check_router_output(h, ids.float(), w)
    with pytest.raises(ContractError, match=r"\[T, K\] with T=3"):
        check_router_output(h, ids[:2], w[:2])
    with pytest.raises(ContractError, match="shape of topk_ids"):
        check_router_output(h, ids, w[:, :1])


def test_check_received_finds_a_padding_row_without_the_sentinel() -> None:
    ids = torch.tensor([[[1, 2], [7, 7]], [[3, 0], [5, 5]]], dtype=torch.int32)
    received = ReceivedTokens(torch.randn(2, 2, 4), ids, torch.rand(2, 2, 2), 7,
                              torch.tensor([1, 2], dtype=torch.int32))
    check_received(received, 6)
    received = ReceivedTokens(received.hidden, ids, received.topk_weights, 7, torch.tensor([1, 1], dtype=torch.int32))
    with pytest.raises(ContractError, match=r"padding row \[1, 1\] has ids \[5, 5\], expected all 7"):
        check_received(received, 6)
