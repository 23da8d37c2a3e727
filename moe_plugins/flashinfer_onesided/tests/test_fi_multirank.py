"""The plugin's dispatch/combine on 2 and 4 gloo ranks against the fake FlashInfer: exact layout and results.

The ranks are real processes running the factory-built stage and the host's
``torch_a2a`` on the same group, so payload order, the sentinel per receiving
rank, ``R`` agreement, combine and the error paths run as they would on GPUs,
with FlashInfer replaced by its CPU fake. Starting processes dominates the
time, so each world size runs all its scenarios in one launch (module fixtures)
and the tests below check their parts of the results.
"""

from __future__ import annotations

from typing import Any

import pytest
from fi_testlib import (
    COUNTS,
    EXPERTS_PER_RANK,
    HIDDEN,
    MAX_TOKENS,
    TOP_K,
    expected_workspace_bytes,
    non_local_sentinel,
    run_ranks,
    run_suite,
)

TRANSPORT = {2: [("moe_alltoall", "non_local", "bfloat16", "ops"), ("moe_ep", "guard_slot", "bfloat16", "ops"),
                 ("moe_alltoall", "non_local", "bfloat16", "methods"), ("moe_ep", "guard_slot", "float32", "methods")],
             4: [("auto", "non_local", "float32", "ops"), ("auto", "guard_slot", "bfloat16", "ops")]}


@pytest.fixture(scope="module")
def world2() -> list[dict[str, Any]]:
    jobs = [("scenario_transport", a) for a in TRANSPORT[2]] + [("scenario_scales", ()), ("scenario_refusals", ()),
                                                           ("scenario_nvlink_refused", ())]
    return run_ranks(2, run_suite, jobs)


@pytest.fixture(scope="module")
def world4() -> list[dict[str, Any]]:
    jobs = [("scenario_transport", a) for a in TRANSPORT[4]] + [("scenario_subgroups", ())]
    return run_ranks(4, run_suite, jobs)


@pytest.mark.parametrize("world,api,strategy,dtype,calls", [(w, *a) for w in TRANSPORT for a in TRANSPORT[w]])
def test_round_trips_match_exact_expectations_and_torch_a2a(world: int, api: str, strategy: str, dtype: str,
                                                            calls: str, request: pytest.FixtureRequest) -> None:
    results = [r[f"scenario_transport{(api, strategy, dtype, calls)}"]
               for r in request.getfixturevalue(f"world{world}")]
    experts = EXPERTS_PER_RANK * world
    item = 2 if dtype == "bfloat16" else 4
    workspace = expected_workspace_bytes(world, MAX_TOKENS, HIDDEN * item + TOP_K * 8, HIDDEN * item)
    for rank, res in enumerate(results):
        assert res["workspace"] == workspace
        # each receiving rank's own sentinel (the ranks check it in every padding row)
        want_sentinel = non_local_sentinel(rank, world, experts) if strategy == "non_local" else experts
        assert res["sentinel"] == want_sentinel
        expected_api = {"moe_alltoall": "moe_alltoall", "moe_ep": "moe_ep"}.get(
            api, "moe_ep" if strategy == "guard_slot" else "moe_alltoall")
        assert res["api"] == expected_api, res["reason"]
        # FlashInfer's ops straight on the workspace, unless their signatures are unknown (then the methods)
        assert res["calls"] == calls
        # R agreed by one all-reduce when not given; none when the caller passes it
        assert res["agreed"]["all_reduce"] == 1 and res["agreed"]["rows"] == max(COUNTS[:world])
        assert res["given"]["all_reduce"] == 0 and res["given"]["rows"] == MAX_TOKENS
        assert res["given"]["stats"]["dispatch"] == 1 and res["given"]["stats"]["combine"] == 1
        assert res["given"]["stats"]["combine_staged"] == 1
        # zero-copy: expert output written into the workspace view skips the staging copy
        assert res["zero_copy"]["stats"].get("combine_in_workspace") == 1
        assert res["zero_copy"]["stats"].get("combine_staged", 0) == 0
        # every rank has 0 tokens and R is agreed: R = 0, both collectives skipped on every rank
        assert res["all_empty_agreed"]["rows"] == 0 and res["all_empty_agreed"]["stats"].get("dispatch", 0) == 0
        # ... but with R given, the collectives run and every received row is padding
        assert res["all_empty_given"]["rows"] == 3 and res["all_empty_given"]["stats"]["dispatch"] == 1
        assert "dispatch called twice without combine" in res["twice"]
        assert res["after_error"]["stats"]["dispatch"] == 1
    # a wrong expert output on rank 0 raises there; the others complete (rank 0 took part with zeros)
    assert "combine expects expert output [ep_size, R, H]" in results[0]["bad_combine"]
    assert all(r["bad_combine"] is None for r in results[1:])


def test_scales_travel_when_reserved_and_are_refused_when_too_wide(world2: list[dict[str, Any]]) -> None:
    for res in (r["scenario_scales()"] for r in world2):
        for api in ("moe_alltoall", "moe_ep"):
            assert res[api]["api"] == api
            assert res[api]["roundtrip"]["stats"]["dispatch"] == 1
            assert res[api]["no_scales"]["stats"]["dispatch"] == 1
            assert res[api]["again"]["stats"].get("combine_in_workspace") == 1
            assert "scale_bytes_per_token=16" in res[api]["too_wide"]


def test_each_ep_group_runs_on_its_own_process_group(world4: list[dict[str, Any]]) -> None:
    results = [r["scenario_subgroups()"] for r in world4]
    assert [r["rows"] for r in results] == [7, 7, 6, 6]
    assert all(r["all_reduce"] == 1 for r in results)


def test_group_wide_refusals_happen_on_every_rank(world2: list[dict[str, Any]]) -> None:
    for res in (r["scenario_refusals()"] for r in world2):
        assert res["disagree"].startswith("ContractError")
        assert "hidden_size: rank 0 has 64, rank 1 has 32" in res["disagree"]
        assert res["moe_ep_in_range"].startswith("ContractError")
        assert "outside [0, E=8)" in res["moe_ep_in_range"] and "api=moe_alltoall" in res["moe_ep_in_range"]


def test_moe_ep_refusing_the_host_falls_back_to_moe_alltoall_under_auto(world2: list[dict[str, Any]]) -> None:
    for res in (r["scenario_nvlink_refused()"] for r in world2):
        assert res["auto"].startswith("moe_alltoall: moe_ep refused this host")
        assert "NVLink backends are not supported on EP ranks [0, 1]" in res["moe_ep"]
