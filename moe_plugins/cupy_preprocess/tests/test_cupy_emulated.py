"""The real kernel source and launch sequence, run by the CPU emulator, against the torch reference.

No GPU needed (see ``emulator/hc_emulate.h``); skipped without a C++20 compiler. Every output is
poisoned and guarded: equality with the reference also proves every entry was written and nothing
outside the buffers was.
"""

from __future__ import annotations

import pytest
import torch
from emulation import EmulatedKernels, FewScanThreads, build
from preprocess_testlib import (Case, assert_layout_valid, assert_matches, check_guards, guarded_buffers, make_case,
                                reference)

from hostcore.contract import LocalRouting
from moe_plugin_cupy_preprocess.buffers import map_with_head
from moe_plugin_cupy_preprocess.launch import launch
from moe_plugin_cupy_preprocess.plan import Plan, choose_map, plan_for


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> EmulatedKernels:
    lib = build(tmp_path_factory.mktemp("emulator"))
    if lib is None:
        pytest.skip("no C++20 compiler (g++/clang++ or $CXX) for the CPU emulation of the kernels")
    return FewScanThreads(lib)


def run(kernels: EmulatedKernels, case: Case, block_m: int | None, mode: str = "safe", map_in: str = "auto",
        path: str = "auto") -> tuple[LocalRouting, Plan]:
    table = case.local.expert_map
    choice = choose_map(None if table is None else int(table.numel()), map_in)
    rows, top_k = case.ids.shape
    plan = plan_for(rows, top_k, case.ids.dtype, block_m, case.local.count, choice, path)
    buffers, backing = guarded_buffers(plan, "cpu")
    device_map = None if table is None else map_with_head(table, "cpu")[1]
    launch(kernels, plan, case.ids.contiguous(), device_map, choice, case.local.first, mode == "faithful", buffers)
    check_guards(backing)
    assert int(buffers.done.sum()) == 0, "grid_scan must leave its done counter at 0"
    return buffers.routing(count_invalid=mode != "faithful"), plan


@pytest.mark.parametrize("sentinel", ["non_local", "guard_slot", "out_of_range", "negative"])
@pytest.mark.parametrize("path", ["block", "grid"])
@pytest.mark.parametrize("map_in", ["shared", "global"])
def test_every_sentinel_on_both_paths(kernels: EmulatedKernels, sentinel: str, path: str, map_in: str) -> None:
    if sentinel == "out_of_range" and map_in == "global":
        pytest.skip("no map to place")
    case = make_case(64, 4, 1, sentinel, rows_per_rank=40, top_k=4, seed=hash((sentinel, path, map_in)) % 1000)
    for block_m in (None, 1, 16):
        got, plan = run(kernels, case, block_m, map_in=map_in, path=path)
        assert plan.path == path
        ref = reference(case, block_m)
        assert_matches(got, ref, block_m, f"{sentinel} {path} {map_in} block_m={block_m}")
        if block_m:
            assert_layout_valid(got, block_m)
    if sentinel == "negative":
        assert int(got.invalid_count) > 0 or case.real_rows == case.ids.shape[0]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_single_block_sizes_and_id_dtypes(kernels: EmulatedKernels, dtype: torch.dtype) -> None:
    # 8 x 2 x 4 = 64 slots (ipt 1), 4 x 128 x 8 = 4096 (ipt 4), 8 x 200 x 8 = 12800 (ipt 16, 32 warps).
    for i, (ep, rows, k) in enumerate([(8, 2, 4), (4, 128, 8), (8, 200, 8)]):
        case = make_case(256, ep, ep - 1, "non_local", rows, k, seed=10 + i, dtype=dtype, round_robin=bool(i % 2))
        got, plan = run(kernels, case, 16)
        assert plan.path == "block" and plan.ipt == (1, 4, 16)[i]
        assert_matches(got, reference(case, 16), 16, f"{ep}x{rows}x{k}")


def test_grid_path_several_tiles_and_int64(kernels: EmulatedKernels) -> None:
    case = make_case(96, 3, 2, "guard_slot", rows_per_rank=1300, top_k=4, seed=3, dtype=torch.int64)  # 15600: 4 tiles
    got, plan = run(kernels, case, 8, path="grid")
    assert plan.tiles == 4
    assert_matches(got, reference(case, 8), 8)
    assert_layout_valid(got, 8)


@pytest.mark.parametrize("path", ["block", "grid"])
def test_more_local_experts_than_a_window(kernels: EmulatedKernels, path: str) -> None:
    # 2100 experts on one rank without a map: three windows of <= 1024 experts.
    case = make_case(2100, 1, 0, "out_of_range", rows_per_rank=700, top_k=6, seed=4)
    got, plan = run(kernels, case, 4, path=path)
    assert plan.windows == 3
    assert_matches(got, reference(case, 4), 4)
    # ... and with a map of 2 ranks (1050 local experts: two windows) read from global memory.
    case = make_case(2100, 2, 1, "non_local", rows_per_rank=300, top_k=8, seed=5, round_robin=True)
    got, plan = run(kernels, case, 2, path=path, map_in="global")
    assert plan.windows == 2 and plan.map.mode == 2
    assert_matches(got, reference(case, 2), 2)


@pytest.mark.parametrize("path", ["block", "grid"])
def test_rank_without_local_experts_and_empty_batches(kernels: EmulatedKernels, path: str) -> None:
    case = make_case(4, 8, 6, "negative", rows_per_rank=3, top_k=2, seed=6)  # ranks 4..7 own no expert
    assert case.local.count == 0
    got, _ = run(kernels, case, 16, path=path)
    assert_matches(got, reference(case, 16), 16)
    empty = make_case(64, 2, 0, "non_local", rows_per_rank=0, top_k=8, seed=7)
    got, _ = run(kernels, empty, 16, path=path)
    assert_matches(got, reference(empty, 16), 16)
    assert got.aligned.sorted_slot_ids.numel() == 0 and int(got.aligned.num_slots_post_padded) == 0


@pytest.mark.parametrize("path", ["block", "grid"])
@pytest.mark.parametrize("map_in", ["shared", "global"])
def test_faithful_reproduces_the_misrouting_that_safe_counts(kernels: EmulatedKernels, path: str, map_in: str) -> None:
    case = make_case(32, 4, 0, "negative", rows_per_rank=50, top_k=4, seed=8)
    padding = case.ids == -1
    assert bool(padding.any())
    safe, _ = run(kernels, case, 16, path=path, map_in=map_in)
    assert int(safe.invalid_count) == int(padding.sum()) and bool((safe.local_ids[padding] == -1).all())
    faithful, _ = run(kernels, case, 16, mode="faithful", path=path, map_in=map_in)
    assert faithful.invalid_count is None
    # The emulator, like the H100 for shared memory and the zero head for global memory, reads 0 below the
    # table: every padding slot becomes a slot of local expert 0.
    assert bool((faithful.local_ids[padding] == 0).all())
    assert torch.equal(faithful.local_ids[~padding], safe.local_ids[~padding])
    assert int(faithful.expert_counts[0]) == int(safe.expert_counts[0]) + int(padding.sum())
    assert_layout_valid(faithful, 16)
