"""The pure rules: which placements FlashInfer can serve, payload order, bytes per token, R checks, API choice."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from moe_plugin_flashinfer_onesided import layout
from moe_plugin_flashinfer_onesided._flashinfer import (
    choose_api,
    release_tuple,
    version_problem,
)

from hostcore.errors import BackendUnavailableError, ContractError
from hostcore.placement import ExpertPlacement

# -- ownership --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts,ep", [(8, 2), (256, 4), (256, 8), (16, 16)])
def test_contiguous_divisible_placements_are_served(experts: int, ep: int) -> None:
    placement = ExpertPlacement.contiguous(experts, ep)
    layout.check_partition(placement, ep)
    assert [layout.flashinfer_owner(e, experts, ep) for e in range(experts)] == list(placement.owner)


def test_round_robin_is_refused_naming_the_expert_and_the_fix() -> None:
    with pytest.raises(ContractError) as err:
        layout.check_partition(ExpertPlacement.round_robin(8, 2), 2)
    msg = str(err.value)
    assert "round-robin placement of E=8 experts on 2 ranks" in msg
    assert "expert 1 lives on rank 1" in msg and "sends its tokens to rank 0" in msg
    assert "ExpertPlacement.contiguous" in msg and "dispatch=torch_a2a" in msg


def test_non_divisible_expert_count_is_refused() -> None:
    with pytest.raises(ContractError, match=r"E divisible by ep_size.*E % ep_size = 2"):
        layout.check_partition(ExpertPlacement.contiguous(10, 4), 4)


def test_custom_placement_and_wrong_group_size_are_refused() -> None:
    owner = [0, 0, 1, 1, 1, 0, 1, 0]  # same counts per rank as contiguous, but not contiguous
    with pytest.raises(ContractError, match="custom placement.*expert 2 lives on rank 1"):
        layout.check_partition(ExpertPlacement.from_owners(owner, 2), 2)
    with pytest.raises(ContractError, match="is for ep_size=2, but the EP group has 4 ranks"):
        layout.check_partition(ExpertPlacement.contiguous(8, 2), 4)


@pytest.mark.parametrize("ep,top_k,experts,max_tokens,match", [
    (1, 2, 8, 4, "dispatch=local"), (65, 2, 130, 4, "ep_size <= 64"), (2, 23, 64, 4, "top_k <= 22"),
    (2, 0, 8, 4, "1 <= top_k"), (2, 9, 8, 4, "exceeds the number of experts"), (2, 2, 8, 0, "max_tokens_per_rank"),
])
def test_kernel_limits(ep: int, top_k: int, experts: int, max_tokens: int, match: str) -> None:
    with pytest.raises(ContractError, match=match):
        layout.check_limits(ep, top_k, experts, max_tokens)


# -- payloads ---------------------------------------------------------------------------------------------


def test_payload_bytes_of_the_deepseek_shape() -> None:
    b = layout.payload_bytes(7168, 8, torch.bfloat16)
    assert (b.hidden, b.dispatch, b.combine) == (14336, 14336 + 64, 14336)
    assert layout.payload_bytes(7168, 8, torch.bfloat16, 224).dispatch == 14336 + 64 + 224
    with pytest.raises(ContractError, match="scale_bytes_per_token must be >= 0"):
        layout.payload_bytes(16, 2, torch.bfloat16, -1)


def test_order_puts_larger_elements_first_and_keeps_hidden_first_among_equals() -> None:
    # [hidden bf16, ids int32, weights fp32]: ids and weights (4 bytes) before hidden (2 bytes)
    assert layout.payload_order([2, 4, 4], [14336, 32, 32]) == [1, 2, 0]
    # fp32 hidden: equal element sizes, the wide hidden row first
    assert layout.payload_order([4, 4, 4], [28672, 32, 32]) == [0, 1, 2]
    # fp8 hidden with fp32 scales
    assert layout.payload_order([1, 4, 4, 4], [7168, 8, 8, 224]) == [3, 1, 2, 0]
    with pytest.raises(ContractError, match="at most 6 payloads"):
        layout.payload_order([1] * 7, [1] * 7)


def _kernel_accepts(element_sizes: list[int], row_elems: list[int], ep: int, rows: int) -> bool:
    """The dispatch op's rule: after each plane the running byte total is a multiple of its element size."""
    total = 0
    for size, elems in zip(element_sizes, row_elems):
        total += ep * rows * elems * size
        if total % size:
            return False
    return True


def test_order_always_satisfies_the_kernels_alignment_rule() -> None:
    rnd = random.Random(0)
    rejected_unsorted = 0
    for _ in range(2000):
        n = rnd.randint(1, 6)
        sizes = [rnd.choice([1, 2, 4, 8]) for _ in range(n)]
        elems = [rnd.randint(1, 9) for _ in range(n)]
        ep, rows = rnd.randint(1, 8), rnd.randint(1, 9)
        order = layout.payload_order(sizes, [s * e for s, e in zip(sizes, elems)])
        assert sorted(order) == list(range(n))
        assert _kernel_accepts([sizes[i] for i in order], [elems[i] for i in order], ep, rows)
        rejected_unsorted += not _kernel_accepts(sizes, elems, ep, rows)
    assert rejected_unsorted > 0  # the rule bites for unsorted orders, so the sort matters


# -- R --------------------------------------------------------------------------------------------------


def test_rows_per_rank_checks() -> None:
    layout.check_rows_per_rank(0, 0, 8, agreed=True)
    layout.check_rows_per_rank(8, 8, 8, agreed=False)
    with pytest.raises(ContractError, match="T=5 tokens but rows_per_rank R=4"):
        layout.check_rows_per_rank(4, 5, 8, agreed=False)
    with pytest.raises(ContractError, match="rows_per_rank R=9 exceeds max_tokens_per_rank=8"):
        layout.check_rows_per_rank(9, 1, 8, agreed=False)
    with pytest.raises(ContractError, match="the largest token count in the EP group R=9 exceeds"):
        layout.check_rows_per_rank(9, 1, 8, agreed=True)
    with pytest.raises(ContractError, match=">= 0"):
        layout.check_rows_per_rank(-1, 0, 8, agreed=False)


# -- FlashInfer API choice and version ------------------------------------------------------------------


def test_auto_prefers_moe_ep_only_when_every_rank_can_use_it() -> None:
    assert choose_api("auto", [True, True], [8, 8], 8)[0] == "moe_ep"  # guard_slot / out_of_range: E
    api, why = choose_api("auto", [True, True], [2, 0], 8)  # non_local: in [0, E)
    assert api == "moe_alltoall" and "sentinel 2 on rank 0 is inside [0, E)" in why
    api, why = choose_api("auto", [True, False], [8, 8], 8)
    assert api == "moe_alltoall" and "missing on ranks [1]" in why
    assert choose_api("auto", [True, True], [-1, -1], 8)[0] == "moe_ep"  # negative: reproduction only
    assert choose_api("moe_alltoall", [True, True], [8, 8], 8)[0] == "moe_alltoall"


def test_forced_moe_ep_explains_why_it_cannot() -> None:
    with pytest.raises(ContractError, match=r"rank 1's sentinel is 3 .*\[8, 3\].*api=auto or api=moe_alltoall"):
        choose_api("moe_ep", [True, True], [8, 3], 8)
    with pytest.raises(BackendUnavailableError, match="missing on ranks \\[0\\]"):
        choose_api("moe_ep", [False, True], [8, 8], 8)
    with pytest.raises(ContractError, match="option api must be one of"):
        choose_api("nvshmem", [True], [8], 8)


@pytest.mark.parametrize("version,ok", [("0.7.2.post1", True), ("0.6.16", True), ("0.6.15", False),
                                        ("0.10.0", True), ("1.0.0rc1", True), ("garbage", False), (None, False)])
def test_version_requirement(version: str | None, ok: bool) -> None:
    problem = version_problem(version)
    assert (problem is None) == ok
    if version is None:
        assert problem == "needs flashinfer-python>=0.6.16: pip install 'flashinfer-python>=0.6.16'"
    elif not ok:
        assert f"found {version}" in problem and "pip install -U" in problem


def test_release_tuple() -> None:
    assert release_tuple("0.7.2.post1") == (0, 7, 2)
    assert release_tuple("0.7") == (0, 7, 0)
    assert [release_tuple(v) for v in ("0.6.9", "0.6.16")] == sorted(release_tuple(v) for v in ("0.6.16", "0.6.9"))
    assert all(a < b for a, b in itertools.pairwise([release_tuple(v) for v in ("0.6.15", "0.6.16", "0.7.0")]))
