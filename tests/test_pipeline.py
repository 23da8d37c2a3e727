"""The whole EP pipeline on CPU ranks joined by gloo, against a single-process dense reference.

Uneven tokens per rank with one rank at 0 tokens, so every rank receives padding
rows; router-skipped (-1) slots in the input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed import run_ranks

from pipeline_workers import all_cases, received_rows, remapped_forward

SAFE_CASES = [("sentinel=non_local", True, "contiguous"), ("sentinel=guard_slot", True, "contiguous"),
              ("sentinel=auto", True, "round_robin"), ("sentinel=guard_slot", True, "round_robin"),
              ("sentinel=out_of_range", False, "contiguous"), ("sentinel=auto", False, "contiguous"),
              ("sentinel=auto,preprocess=torch(mode=checked)", True, "contiguous")]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_safe_sentinels_match_the_dense_reference(world: int, tmp_path: Path) -> None:
    cases = [c for c in SAFE_CASES if not (world == 1 and "non_local" in c[0])]  # no non-local expert at EP 1
    per_rank = run_ranks(world, all_cases, cases, tmp=tmp_path)
    assert [r[0]["tokens"] for r in per_rank][-1] == (0 if world > 1 else 7), "the last rank has no tokens"
    for i, case in enumerate(cases):
        for rank, results in enumerate(per_rank):
            r = results[i]
            assert "refused" not in r and "forward_error" not in r, (case, rank, r)
            assert r["rel_err"] < 1e-6, (case, rank, r["rel_err"])
            assert r["trace"].misrouted_rows == 0, (case, rank)
            assert r["trace"].padding_rows > 0, "R > every token count: every rank sees padding"


def test_non_local_is_refused_when_every_expert_is_local(tmp_path: Path) -> None:
    (r,) = run_ranks(1, all_cases, [("sentinel=non_local", True, "contiguous")], tmp=tmp_path)
    assert "every expert is local" in r[0]["refused"]


def test_negative_sentinel_refused_caught_and_misrouting(tmp_path: Path) -> None:
    cases = [("sentinel=negative", True, "contiguous"),
             ("sentinel=negative(allow_unsafe=true),preprocess=torch(mode=checked)", True, "contiguous"),
             ("sentinel=negative(allow_unsafe=true),preprocess=torch(mode=faithful)", True, "contiguous")]
    per_rank = run_ranks(4, all_cases, cases, tmp=tmp_path)
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


def test_router_skipped_slots_never_reach_another_rank(tmp_path: Path) -> None:
    per_rank = run_ranks(4, received_rows, tmp=tmp_path)
    # Token 0 of each rank goes to the owners of experts 0 (rank 0) and 9 (rank 3) only: its skipped slot
    # adds no destination. The fully skipped tokens 1.. stay on their own rank.
    tokens = [5, 3, 0, 4]
    for dest, r in enumerate(per_rank):
        for src, n in enumerate(r["real_rows_from"]):
            expected = int(dest in (0, 3) and tokens[src] > 0) + (max(tokens[src] - 1, 0) if src == dest else 0)
            assert n == expected, (src, dest, n, expected)


def test_remap_rechooses_the_sentinel_and_keeps_results_right(tmp_path: Path) -> None:
    """EPLB-style remap: the sentinel is re-chosen for the new map (build time), and the forward stays exact."""
    per_rank = run_ranks(4, remapped_forward, tmp=tmp_path)
    # Contiguous 10 experts on 4 ranks: rank 0 owns 0-2, so its first non-local id is 3; the others' is 0.
    assert [r["before"] for r in per_rank] == [3, 0, 0, 0]
    # Round-robin: rank r owns r, r+4, r+8; the first non-local id is 1 on rank 0 and 0 elsewhere.
    assert [r["after"] for r in per_rank] == [1, 0, 0, 0]
    for rank, r in enumerate(per_rank):
        assert r["map_after"][r["after"]] == -1
        assert [e for e, v in enumerate(r["map_after"]) if v >= 0] == list(range(rank, 10, 4))
        assert r["rel_err"] < 1e-6
