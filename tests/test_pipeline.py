"""The whole EP pipeline on CPU ranks joined by gloo, against a single-process dense reference.

Uneven tokens per rank with one rank at 0 tokens, so every rank receives padding
rows; router-skipped (-1) slots in the input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed import run_ranks

from hostcore.contract import check_received
from hostcore.errors import ContractError, UnsafeSentinelError
from hostcore.layer import EPMoELayer, padding_mask
from hostcore.placement import ExpertPlacement
from hostcore.workload import MoEShape, dense_reference, experts_weights, synthetic_router_output, uneven_token_counts

SHAPE = MoEShape("test", 256, 128, 10, 3)  # 10 experts: not divisible by 4 ranks


def _layer(rank: int, world: int, backends: str, use_map: bool, placement: ExpertPlacement, tokens: list[int]):
    local = placement.local_experts(rank, use_map).global_ids()
    return EPMoELayer(placement, experts_weights(SHAPE, local, seed=1), hidden_size=SHAPE.hidden_size,
                      top_k=SHAPE.top_k, max_tokens_per_rank=max(tokens) + 1, dtype=torch.float32, rank=rank,
                      backends=backends, use_expert_map=use_map)


def _forward_case(rank: int, world: int, backends: str, use_map: bool, kind: str) -> dict:
    placement = getattr(ExpertPlacement, kind)(SHAPE.num_experts, world)
    tokens = uneven_token_counts(7, world)
    router = synthetic_router_output(SHAPE, tokens[rank], seed=1, rank=rank, dtype=torch.float32, skip_fraction=0.2)
    result: dict = {"tokens": tokens[rank]}
    try:
        layer = _layer(rank, world, backends, use_map, placement, tokens)
    except UnsafeSentinelError as exc:
        return {**result, "refused": str(exc)}
    try:
        out, trace = layer.forward_traced(router.hidden, router.topk_ids, router.topk_weights, max(tokens) + 1)
    except ContractError as exc:
        return {**result, "forward_error": str(exc)}
    ref = dense_reference(router, SHAPE, seed=1, compute_dtype=torch.float64)
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    err = float((out.double() - ref).abs().max()) / scale if ref.numel() else 0.0
    return {**result, "rel_err": err, "trace": trace, "sentinel": layer.sentinel,
            "last_local_is_mapped_by_minus_one": use_map and int(layer.local.expert_map[-1]) >= 0}


def _all_cases(rank: int, world: int, cases: list[tuple[str, bool, str]]) -> list[dict]:
    return [_forward_case(rank, world, *case) for case in cases]


SAFE_CASES = [("sentinel=non_local", True, "contiguous"), ("sentinel=guard_slot", True, "contiguous"),
              ("sentinel=auto", True, "round_robin"), ("sentinel=guard_slot", True, "round_robin"),
              ("sentinel=out_of_range", False, "contiguous"), ("sentinel=auto", False, "contiguous"),
              ("sentinel=auto,preprocess=torch(mode=checked)", True, "contiguous")]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_safe_sentinels_match_the_dense_reference(world: int, tmp_path: Path) -> None:
    cases = [c for c in SAFE_CASES if not (world == 1 and "non_local" in c[0])]  # no non-local expert at EP 1
    per_rank = run_ranks(world, _all_cases, cases, tmp=tmp_path)
    assert [r[0]["tokens"] for r in per_rank][-1] == (0 if world > 1 else 7), "the last rank has no tokens"
    for i, case in enumerate(cases):
        for rank, results in enumerate(per_rank):
            r = results[i]
            assert "refused" not in r and "forward_error" not in r, (case, rank, r)
            assert r["rel_err"] < 1e-6, (case, rank, r["rel_err"])
            assert r["trace"].misrouted_rows == 0, (case, rank)
            assert r["trace"].padding_rows > 0, "R > every token count: every rank sees padding"


def test_non_local_is_refused_when_every_expert_is_local(tmp_path: Path) -> None:
    (r,) = run_ranks(1, _all_cases, [("sentinel=non_local", True, "contiguous")], tmp=tmp_path)
    assert "every expert is local" in r[0]["refused"]


def test_negative_sentinel_refused_caught_and_misrouting(tmp_path: Path) -> None:
    cases = [("sentinel=negative", True, "contiguous"),
             ("sentinel=negative(allow_unsafe=true),preprocess=torch(mode=checked)", True, "contiguous"),
             ("sentinel=negative(allow_unsafe=true),preprocess=torch(mode=faithful)", True, "contiguous")]
    per_rank = run_ranks(4, _all_cases, cases, tmp=tmp_path)
    refused, checked, faithful = zip(*per_rank)
    assert all("allow_unsafe" in r["refused"] and "-1" in r["refused"] for r in refused), refused[0]
    assert all("ids outside the expert map" in r["forward_error"] for r in checked), checked[0]
    last = faithful[-1]
    assert last["last_local_is_mapped_by_minus_one"]
    assert last["trace"].misrouted_rows == last["trace"].padding_rows > 0, "every padding row misrouted"
    assert list(last["trace"].misrouted_to) == [len(last["trace"].rows_per_local_expert) - 1], \
        "misrouted to the last local expert, expert_map[-1]"
    assert all(r["trace"].misrouted_rows == 0 for r in faithful[:-1]), "expert_map[-1] is -1 on the other ranks"
    assert all(r["rel_err"] < 1e-6 for r in faithful), "the misrouting is silent: outputs still match"


def _received_rows(rank: int, world: int) -> dict:
    placement = ExpertPlacement.contiguous(SHAPE.num_experts, world)
    tokens = [5, 3, 0, 4]
    layer = _layer(rank, world, "sentinel=auto", True, placement, tokens)
    ids = torch.full((tokens[rank], SHAPE.top_k), -1, dtype=torch.int32)
    if tokens[rank]:
        ids[0] = torch.tensor([0, 9, -1])  # one real token with a skipped slot; the others fully skipped
    prepared = layer.prepare.prepare(torch.randn(tokens[rank], SHAPE.hidden_size), ids, torch.rand(ids.shape))
    received = layer.dispatch.dispatch(prepared, max(tokens))
    check_received(received, SHAPE.num_experts)
    real = received.rows_per_source.tolist()
    layer.dispatch.combine(received.hidden.new_zeros(received.hidden.shape))
    return {"real_rows_from": real, "padding": int(padding_mask(received).sum())}


def test_router_skipped_slots_never_reach_another_rank(tmp_path: Path) -> None:
    per_rank = run_ranks(4, _received_rows, tmp=tmp_path)
    # Token 0 of each rank goes to the owners of experts 0 (rank 0) and 9 (rank 3) only: its skipped slot
    # adds no destination. The fully skipped tokens 1.. stay on their own rank.
    tokens = [5, 3, 0, 4]
    for dest, r in enumerate(per_rank):
        for src, n in enumerate(r["real_rows_from"]):
            expected = int(dest in (0, 3) and tokens[src] > 0) + (max(tokens[src] - 1, 0) if src == dest else 0)
            assert n == expected, (src, dest, n, expected)
