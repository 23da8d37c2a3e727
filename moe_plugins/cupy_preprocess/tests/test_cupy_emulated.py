"""The real kernel source and launch sequence, run by the CPU emulator, against the torch reference.

No GPU needed (see ``emulator/hc_emulate.h``); skipped without a C++20 compiler. Every output is
poisoned and guarded: equality with the reference also proves every entry was written and nothing
outside the buffers was.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from emulation import EmulatedKernels, FewScanThreads, build
from preprocess_testlib import (POISON, Case, assert_layout_valid, assert_matches, check_guards, check_sync_words,
                                guarded_buffers, make_case, make_ids, make_local, reference)

from hostcore.contract import LocalRouting
from moe_plugin_cupy_preprocess.buffers import map_with_head
from moe_plugin_cupy_preprocess.launch import launch
from moe_plugin_cupy_preprocess.plan import (FUSED_GROUP_BLOCKS, GRID_WARPS, LANE_MAX_LOCAL, LANE_MAX_SLOTS, MAP_NONE,
                                             OFFSETS_MAX_CHUNK, PLACE_QUEUE, STAGE_KEYED, STAGE_OFFSETS, TILE,
                                             TWO_PHASE_LIMIT, WARP_MAX_LOCAL, WARP_MAX_SLOTS,
                                             MapChoice, Plan,
                                             choose_map, plan_for)
from moe_plugin_cupy_preprocess.plan import CLUSTER_SIZES


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> EmulatedKernels:
    lib = build(tmp_path_factory.mktemp("emulator"))
    if lib is None:
        pytest.skip("no C++20 compiler (g++/clang++ or $CXX) for the CPU emulation of the kernels")
    return FewScanThreads(lib)


def run(kernels: EmulatedKernels, case: Case, block_m: int | None, mode: str = "safe", map_in: str = "auto",
        path: str = "auto", fused: bool = True, launches: int = 1,
        two_phase_limit: int = TWO_PHASE_LIMIT, block_grid: int | None = None,
        lanes: bool = True, max_cluster: int = 0, stage_type: str | None = None) -> tuple[LocalRouting, Plan]:
    """Run the real launch sequence ``launches`` times into the same guarded buffers (poisoned again before
    each run: a replay must rewrite everything); ``fused=False`` plans as a device without cooperative
    launches (the three-launch grid path); ``block_grid`` fixes the block path's number of blocks;
    ``lanes=False`` keeps warp_preprocess / block_preprocess where the lane kernels would run; ``max_cluster`` (8 or
    16) plans as a device with thread-block clusters that wide (cluster_lane_preprocess past one block's slots);
    ``stage_type`` replaces a keyed stage's entries by another type (offsets take half its shared memory)."""
    table = case.local.expert_map
    choice = choose_map(None if table is None else int(table.numel()), map_in)
    rows, top_k = case.ids.shape
    plan = plan_for(rows, top_k, case.ids.dtype, block_m, case.local.count, choice, path, num_sms=kernels.num_sms,
                    fused_occupancy=kernels.fused_occupancy("int32") if fused else None, two_phase_limit=two_phase_limit,
                    block_grid=block_grid, lanes=lanes, max_cluster=max_cluster)
    if stage_type is not None:
        plan = as_stage(plan, stage_type)
    return run_plan(kernels, case, plan, mode, launches), plan


def as_stage(plan: Plan, stage_type: str) -> Plan:
    """``plan`` with its stage entries of ``stage_type``, in the same shared memory: from keyed entries to offsets
    (half the bytes) where the chunk allows, or unchanged."""
    assert plan.fused and plan.stage_cap and plan.stage_type in (STAGE_KEYED, stage_type), plan
    assert stage_type == STAGE_KEYED or plan.chunk <= OFFSETS_MAX_CHUNK, plan
    return dataclasses.replace(plan, stage_type=stage_type)


def run_plan(kernels: EmulatedKernels, case: Case, plan: Plan, mode: str = "safe", launches: int = 1) -> LocalRouting:
    """`run` for a given ``plan``: ``launches`` launches into the same guarded buffers, each poisoned first; the
    guards after every launch and the sync words after the last are checked."""
    buffers, backing = guarded_buffers(plan, "cpu")
    table = case.local.expert_map
    device_map = None if table is None else map_with_head(table, "cpu")[1]
    for _ in range(launches):
        for t in (buffers.local_ids, buffers.expert_counts, buffers.invalid_count, buffers.sorted_slot_ids,
                  buffers.block_expert_ids, buffers.num_slots_post_padded):
            t.fill_(POISON)
        launch(kernels, plan, case.ids.contiguous(), device_map, plan.map, case.local.first, mode == "faithful",
               buffers)
        check_guards(backing)
    check_sync_words(buffers, launches)
    return buffers.routing(count_invalid=mode != "faithful")


@pytest.mark.parametrize("sentinel", ["non_local", "guard_slot", "out_of_range", "negative"])
@pytest.mark.parametrize("path", ["warp", "block", "grid"])
@pytest.mark.parametrize("map_in", ["shared", "global"])
def test_every_sentinel_on_both_paths(kernels: EmulatedKernels, sentinel: str, path: str, map_in: str) -> None:
    if sentinel == "out_of_range" and map_in == "global":
        pytest.skip("no map to place")
    rows = 30 if path == "warp" else 40  # the warp kernel takes at most 512 slots
    case = make_case(64, 4, 1, sentinel, rows_per_rank=rows, top_k=4, seed=hash((sentinel, path, map_in)) % 1000)
    for block_m in (None, 1, 16):
        got, plan = run(kernels, case, block_m, map_in=map_in, path=path)
        assert plan.path == path
        ref = reference(case, block_m)
        assert_matches(got, ref, block_m, f"{sentinel} {path} {map_in} block_m={block_m}")
        if block_m:
            assert_layout_valid(got, block_m)
    if sentinel == "negative":
        assert int(got.invalid_count) > 0 or case.real_rows == case.ids.shape[0]


@pytest.mark.parametrize("lanes", [True, False])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_block_path_sizes_and_id_dtypes(kernels: EmulatedKernels, dtype: torch.dtype, lanes: bool) -> None:
    # 8 x 2 x 4 = 64 slots (ipt 1), 4 x 128 x 8 = 4096 (ipt 4), 4 x 400 x 4 = 6400 (ipt 8, 25 warps),
    # 8 x 200 x 8 = 12800 (ipt 16, 25 warps); 32 local experts at ep 8, 64 at ep 4 (block_lane_preprocess with
    # one or two experts per lane unless lanes=False).
    for i, (ep, rows, k) in enumerate([(8, 2, 4), (4, 128, 8), (4, 400, 4), (8, 200, 8)]):
        case = make_case(256, ep, ep - 1, "non_local", rows, k, seed=10 + i, dtype=dtype, round_robin=bool(i % 2))
        got, plan = run(kernels, case, 16, path="block", lanes=lanes)  # 12800 is past the auto switch
        assert plan.path == "block" and plan.ipt == (1, 4, 8, 16)[i] and plan.lanes == lanes
        assert plan.experts_per_lane == (0 if not lanes else 1 if ep == 8 else 2)
        assert_matches(got, reference(case, 16), 16, f"{ep}x{rows}x{k}")


@pytest.mark.parametrize("lanes", [True, False])
@pytest.mark.parametrize("blocks", [2, 3, 5, 16])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_block_kernel_over_several_blocks(kernels: EmulatedKernels, blocks: int, dtype: torch.dtype,
                                          lanes: bool) -> None:
    # Every block maps and counts all slots and places its own (virtual) warps: 800 slots (ipt 1), 2400 (ipt 4,
    # 19 warps: ragged shares), 7200 (ipt 8, 29 warps) and 12160 (ipt 16), with and without a layout, safe
    # and faithful; 32, 64 or 16 local experts: block_lane_preprocess, or block_preprocess with lanes=False.
    for i, (ep, rows, k) in enumerate([(4, 50, 4), (4, 100, 6), (2, 600, 6), (8, 190, 8)]):
        case = make_case(128, ep, 1, "negative" if i == 1 else "non_local", rows, k, seed=40 + i + blocks, dtype=dtype,
                         round_robin=bool(i % 2))
        for block_m in (None, 1, 16):
            for mode in ("safe", "faithful") if i == 0 else ("safe",):
                got, plan = run(kernels, case, block_m, mode=mode, path="block", block_grid=blocks, lanes=lanes)
                rows_total = plan.active_warps * (plan.ipt // plan.sub)
                assert plan.path == "block" and 1 < plan.grid_blocks <= blocks and plan.lanes == lanes
                assert (plan.grid_blocks - 1) * plan.owned_rows < rows_total <= plan.grid_blocks * plan.owned_rows
                assert kernels.launches[-1][1] == plan.grid_blocks
                ref = reference(case, block_m, mode)
                assert_matches(got, ref, block_m, f"{blocks} blocks, {case.ids.numel()} slots, block_m={block_m} {mode}")
                if block_m:
                    assert_layout_valid(got, block_m)


# --- the cluster kernel: 8 blocks that split the slots ----------------------------------------------------

# (global experts, ep, rows per rank, top_k): ep * rows * top_k = 1056 and 2400 slots (1 per thread; 2400 on 16
# blocks where they fit), 9024 (2 on 8 blocks, 1 on 16), 20032 (4; 2) and 40000 (8; 4), and 65792 (16 blocks, 8 per thread), ragged last warps and
# blocks; 32 local experts (one per lane) and 64 (two per lane). Cluster (blocks, ipt) per size and widest cluster:
CLUSTER_CASES = [(256, 8, 33, 4), (128, 2, 150, 8), (256, 4, 282, 8), (256, 8, 313, 8), (256, 4, 1250, 8),
                 (256, 8, 1028, 8)]
CLUSTER_SHAPES = {8: {1056: (8, 1), 2400: (8, 1), 9024: (8, 2), 20032: (8, 4), 40000: (8, 8)},
                  16: {1056: (8, 1), 2400: (16, 1), 9024: (16, 1), 20032: (16, 2), 40000: (16, 4), 65792: (16, 8)}}


@pytest.mark.parametrize("shape", CLUSTER_CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("max_cluster", CLUSTER_SIZES)
def test_cluster_kernel_against_the_reference(kernels: EmulatedKernels, shape: tuple[int, int, int, int],
                                              dtype: torch.dtype, max_cluster: int) -> None:
    experts, ep, rows, k = shape
    if ep * rows * k not in CLUSTER_SHAPES[max_cluster]:
        pytest.skip(f"{ep * rows * k} slots are more than one cluster of {max_cluster} blocks takes")
    case = make_case(experts, ep, ep - 1, "negative" if rows % 2 else "non_local", rows, k, seed=rows + ep, dtype=dtype,
                     round_robin=ep == 4)
    for block_m in (None, 1, 16, 64):
        got, plan = run(kernels, case, block_m, path="block", max_cluster=max_cluster)  # (auto: the grid past 16K)
        assert plan.kernel_names == ("cluster_lane_preprocess",) and plan.experts_per_lane == (1 if ep == 8 else 2)
        assert (plan.grid_blocks, plan.ipt) == CLUSTER_SHAPES[max_cluster][case.ids.numel()]
        id_type = "long long" if dtype == torch.int64 else "int"
        name = f"cluster_lane_preprocess<{id_type}, {plan.ipt}, {plan.experts_per_lane}, {plan.grid_blocks}>"
        assert kernels.launches[-1][:3] == (name, plan.grid_blocks, plan.block_threads)
        assert_matches(got, reference(case, block_m), block_m, f"{shape} {dtype} block_m={block_m}")
        if block_m:
            assert_layout_valid(got, block_m)


@pytest.mark.parametrize("sentinel", ["non_local", "guard_slot", "out_of_range", "negative"])
@pytest.mark.parametrize("map_in", ["shared", "global"])
def test_cluster_kernel_every_sentinel_map_place_and_mode(kernels: EmulatedKernels, sentinel: str, map_in: str) -> None:
    if sentinel == "out_of_range" and map_in == "global":
        pytest.skip("no map to place")
    case = make_case(64, 2, 1, sentinel, rows_per_rank=700, top_k=4, seed=hash((sentinel, map_in)) % 1000)  # 5600
    # (faithful with -1 padding misroutes on purpose: test_faithful_reproduces_the_misrouting_that_safe_counts)
    for mode in ("safe", "faithful") if sentinel != "negative" else ("safe",):
        got, plan = run(kernels, case, 16, mode=mode, map_in=map_in, max_cluster=16)
        assert plan.cluster and plan.ipt == 1 and plan.grid_blocks == 16
        assert_matches(got, reference(case, 16, mode), 16, f"{sentinel} {map_in} {mode}")
    if sentinel == "negative":
        assert int(got.invalid_count) > 0 or case.real_rows == case.ids.shape[0]


def test_cluster_kernel_with_few_warps_per_expert_and_replays(kernels: EmulatedKernels) -> None:
    """1025 slots: 8 blocks of 5 warps (40 warps < 64 experts: the padding falls back to one lane per expert);
    every slot local with no map; three launches into the same poisoned buffers."""
    case = make_case(64, 1, 0, "out_of_range", rows_per_rank=1025, top_k=1, seed=77)
    for block_m in (1, 16, 64):
        got, plan = run(kernels, case, block_m, max_cluster=16, launches=3)
        assert plan.cluster and plan.block_threads == 160 and plan.experts_per_lane == 2
        assert_matches(got, reference(case, block_m), block_m, f"block_m={block_m}")
        assert_layout_valid(got, block_m)


@pytest.mark.parametrize("fused", [True, False])
def test_grid_path_several_tiles_and_int64(kernels: EmulatedKernels, fused: bool) -> None:
    case = make_case(96, 3, 2, "guard_slot", rows_per_rank=1300, top_k=4, seed=3, dtype=torch.int64)  # 15600: 4 tiles
    got, plan = run(kernels, case, 8, path="grid", fused=fused)
    assert plan.tiles == 4 and plan.fused == fused
    assert [name for name, *_ in kernels.launches[-len(plan.kernel_names):]] == \
        [n if n != "grid_fused" else f"grid_fused<long long, {plan.stage_type}>" for n in plan.kernel_names] or not fused
    assert_matches(got, reference(case, 8), 8)
    assert_layout_valid(got, 8)


# --- the fused single-launch grid kernel ------------------------------------------------------------------

# N*K around the fused kernel's boundaries: one tile, a tile +- 1, several tiles per block (2 emulated SMs x 2
# blocks: at most 4 blocks), a chunk boundary +- 1, and a size that is not a multiple of the 16-byte vector.
FUSED_SIZES = [1, 5, TILE - 1, TILE, TILE + 1, 4 * TILE + 3, 5 * TILE - 1, 5 * TILE, 5 * TILE + 1, 9 * TILE + 7]


@pytest.mark.parametrize("nk", FUSED_SIZES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_fused_grid_kernel_sizes_against_the_reference(kernels: EmulatedKernels, nk: int, dtype: torch.dtype) -> None:
    placement, local, sentinel = make_local(64, 4, 1, "non_local")
    gen = torch.Generator().manual_seed(nk * 7 + (dtype == torch.int64))
    ids, real = make_ids(64, 1, nk, 1, sentinel, gen, dtype)
    ids = ids.reshape(-1, 1)
    case = Case(placement, 1, local, sentinel, ids, real)
    for block_m in (None, 16) if dtype == torch.int32 else (1,):
        got, plan = run(kernels, case, block_m, path="grid")
        assert plan.fused and plan.chunk % TILE == 0 and (plan.grid_blocks - 1) * plan.chunk < max(nk, 1)
        assert plan.keys_in_smem == bool(block_m)
        assert_matches(got, reference(case, block_m), block_m, f"nk={nk} {dtype} block_m={block_m}")
        if block_m:
            assert_layout_valid(got, block_m)


@pytest.mark.parametrize("sentinel", ["non_local", "guard_slot", "out_of_range", "negative"])
@pytest.mark.parametrize("map_in", ["shared", "global"])
def test_fused_every_sentinel_map_place_and_block_m(kernels: EmulatedKernels, sentinel: str, map_in: str) -> None:
    if sentinel == "out_of_range" and map_in == "global":
        pytest.skip("no map to place")
    case = make_case(256, 8, 3, sentinel, rows_per_rank=300, top_k=8, seed=hash((sentinel, map_in, "fused")) % 1000,
                     round_robin=sentinel != "out_of_range")  # 19200 slots: 5 tiles, 3 blocks of 2 tiles
    for block_m in (1, 48) if map_in == "shared" else (8, 64):
        got, plan = run(kernels, case, block_m, map_in=map_in, path="grid")
        assert plan.fused and plan.grid_blocks == 3 and plan.map.mode == (0 if sentinel == "out_of_range" else
                                                                         (1 if map_in == "shared" else 2))
        assert_matches(got, reference(case, block_m), block_m, f"{sentinel} {map_in} block_m={block_m}")
        assert_layout_valid(got, block_m)


@pytest.mark.parametrize("stage_type", [STAGE_KEYED, STAGE_OFFSETS])
@pytest.mark.parametrize("experts, ep", [(96, 4), (160, 4), (256, 4), (320, 4)])
def test_fused_group_starts_by_one_warp_or_the_block(kernels: EmulatedKernels, experts: int, ep: int,
                                                     stage_type: str) -> None:
    """24, 40 and 64 local experts (warp 0 scans one or two rounds of 32) and 80 (block scans); 3 blocks of 2
    tiles, staged (keyed entries, or offsets: the copy-out's expert search takes 1-3 rounds of 32), two launches
    into the same buffers."""
    case = make_case(experts, ep, 1, "non_local", rows_per_rank=600, top_k=8, seed=experts)
    for block_m in (16, 64):
        got, plan = run(kernels, case, block_m, path="grid", launches=2, stage_type=stage_type)
        assert plan.fused and plan.grid_blocks == 3 and plan.stage_cap == plan.chunk == 2 * TILE
        assert_matches(got, reference(case, block_m), block_m, f"{case.local.count} local experts block_m={block_m}")
        assert_layout_valid(got, block_m)


def test_fused_two_phase_scan_fallback_and_replays(kernels: EmulatedKernels) -> None:
    # 300 local experts x 2 blocks (3 tiles: 2 + 1), over a lowered limit: the distributed column scan (two barriers).
    case = make_case(300, 1, 0, "out_of_range", rows_per_rank=1100, top_k=8, seed=21, dtype=torch.int64)
    got, plan = run(kernels, case, 16, path="grid", launches=2, two_phase_limit=300)
    assert plan.fused and plan.two_phase and plan.grid_blocks == 2 and plan.chunk == 2 * TILE
    assert_matches(got, reference(case, 16), 16, "two-phase, 2 launches into the same buffers")
    # 300 local experts, one barrier, the map in global memory; two runs: the barrier words are reused without
    # a reset.
    case = make_case(600, 2, 1, "guard_slot", rows_per_rank=600, top_k=8, seed=22)
    got, plan = run(kernels, case, 4, path="grid", map_in="global", launches=2)
    assert plan.fused and not plan.two_phase
    assert_matches(got, reference(case, 4), 4, "one barrier, 2 launches")
    # A map forced into shared memory that leaves no room for grid_fused (55 000 entries + 16 x 250 per-warp
    # counters > 227 KiB): the three-launch path (planning only).
    big = plan_for(16_000, 8, torch.int32, 16, 250, choose_map(55_000, "shared"), "grid", num_sms=kernels.num_sms,
                   fused_occupancy=kernels.fused_occupancy("int32"))
    assert not big.fused and big.kernel_names == ("grid_count", "grid_scan", "grid_place")


def run_fused_plan(kernels: EmulatedKernels, case: Case, plan: Plan, block_m: int | None, launches: int = 1) -> None:
    """`run_plan`, then every output of the last launch checked against the reference."""
    got = run_plan(kernels, case, plan, launches=launches)
    assert_matches(got, reference(case, block_m), block_m)
    assert int(got.invalid_count) == int((case.ids < 0).sum())


@pytest.mark.parametrize("group_blocks", [1, 2, 3])
@pytest.mark.parametrize("block_m", [None, 16])
def test_fused_group_sums_alternate_halves(kernels: EmulatedKernels, group_blocks: int, block_m: int | None) -> None:
    """4 blocks in groups of 1, 2 and 3 (the last group short): each block's prefix is the sums of the groups
    below it plus the counts of its own group's lower blocks. Three launches into the same buffers: each one
    uses the half of the group sums that the one before zeroed (check_sync_words checks both halves)."""
    case = make_case(64, 4, 2, "negative", rows_per_rank=4000, top_k=8, seed=40 + group_blocks)
    choice = choose_map(int(case.local.expert_map.numel()), "auto")
    plan = plan_for(case.ids.shape[0], 8, torch.int32, block_m, case.local.count, choice, "grid",
                    num_sms=kernels.num_sms, fused_occupancy=kernels.fused_occupancy("int32"))
    assert plan.fused and not plan.two_phase and plan.grid_blocks == 4 and plan.group_blocks == FUSED_GROUP_BLOCKS
    run_fused_plan(kernels, case, dataclasses.replace(plan, group_blocks=group_blocks), block_m, launches=3)


@pytest.mark.parametrize("staged", [STAGE_KEYED, STAGE_OFFSETS, None])
@pytest.mark.parametrize("dtype, sentinel", [(torch.int32, "negative"), (torch.int64, "out_of_range")])
def test_fused_full_lists_reread_local_ids(kernels: EmulatedKernels, dtype: torch.dtype, sentinel: str,
                                           staged: str | None) -> None:
    """Phase 3 past a full list: every expert local (ep_size 1, ~3/4 of the slots local), lists cut to the
    least (PLACE_QUEUE entries) by a shared-memory limit, segments of 512 slots: every warp's list fills up
    part-way and the rest of its local slots are re-read from local_ids in batches behind the remainder; into
    the block's stage (keyed entries or offsets; it keeps its whole chunk: the lists give way first) or
    (``None``) straight to `sorted`."""
    case = make_case(16, 1, 0, sentinel, rows_per_rank=6000, top_k=4, seed=24, dtype=dtype)
    table = case.local.expert_map
    choice = choose_map(None if table is None else int(table.numel()), "auto")
    kw = {"num_sms": kernels.num_sms, "fused_occupancy": kernels.fused_occupancy("int32"), "staged": bool(staged)}
    base_plan = plan_for(case.ids.shape[0], 4, dtype, 16, case.local.count, choice, "grid", **kw)
    assert base_plan.chunk // GRID_WARPS == 512 and base_plan.list_cap == 512
    assert base_plan.stage_cap == (base_plan.chunk if staged else 0)
    plan = plan_for(case.ids.shape[0], 4, dtype, 16, case.local.count, choice, "grid",
                    smem_optin=base_plan.smem_fused_bytes - 4 * GRID_WARPS * (512 - PLACE_QUEUE), **kw)
    assert plan.fused and plan.list_cap == PLACE_QUEUE and plan.stage_cap == base_plan.stage_cap
    run_fused_plan(kernels, case, as_stage(plan, staged) if staged else plan, 16)


@pytest.mark.parametrize("stage_type", [STAGE_KEYED, STAGE_OFFSETS])
def test_fused_blocks_whose_local_slots_overflow_the_stage_store_directly(kernels: EmulatedKernels,
                                                                         stage_type: str) -> None:
    """A stage smaller than some blocks' local slots: those blocks stage up to its end and store the rest straight
    to `sorted`, the others stage all of theirs, in the same launch (3 blocks of 8192 slots, ~3/4 local, the stage
    cut between the blocks' counts; keyed entries or offsets)."""
    case = make_case(16, 1, 0, "negative", rows_per_rank=6000, top_k=4, seed=31)
    choice = choose_map(int(case.local.expert_map.numel()), "auto")
    plan = plan_for(case.ids.shape[0], 4, torch.int32, 16, case.local.count, choice, "grid", num_sms=kernels.num_sms,
                    fused_occupancy=kernels.fused_occupancy("int32"))
    local = (reference(case, None).local_ids.reshape(-1) >= 0).int()
    per_block = sorted(int(local[g * plan.chunk:(g + 1) * plan.chunk].sum()) for g in range(plan.grid_blocks))
    assert plan.grid_blocks == 3 and plan.stage_cap == plan.chunk and per_block[0] < per_block[-1], per_block
    cut = dataclasses.replace(as_stage(plan, stage_type), stage_cap=per_block[0])  # the least-local block stages all
    run_fused_plan(kernels, case, cut, 16)


def test_fused_stage_entries_by_chunk_size(kernels: EmulatedKernels) -> None:
    """Every expert local, so keyed entries cannot hold a block's slots: chunks of up to 65536 slots take offsets,
    whose stage holds twice as many (2 blocks of 16 tiles, planned for one SM); past that (2 blocks of 18 tiles)
    the stage stays keyed, each block's ~55K local slots overflow it and the rest are stored straight to
    `sorted`."""
    case = make_case(16, 1, 0, "negative", rows_per_rank=9200, top_k=16, seed=33)
    choice = choose_map(int(case.local.expert_map.numel()), "auto")
    kw = {"num_sms": 1, "fused_occupancy": kernels.fused_occupancy("int32")}
    plan = plan_for(case.ids.shape[0], 16, torch.int32, 16, case.local.count, choice, "grid", **kw)
    assert plan.fused and plan.grid_blocks == 2 and plan.chunk > OFFSETS_MAX_CHUNK, plan
    assert plan.stage_type == STAGE_KEYED and 0 < plan.stage_cap < plan.chunk // 2, plan
    run_fused_plan(kernels, case, plan, 16)
    small = make_case(16, 1, 0, "negative", rows_per_rank=8000, top_k=16, seed=34)
    plan = plan_for(small.ids.shape[0], 16, torch.int32, 16, small.local.count, choice, "grid", **kw)
    assert plan.chunk == OFFSETS_MAX_CHUNK and plan.stage_type == STAGE_OFFSETS, plan
    assert plan.chunk // 2 < plan.stage_cap < plan.chunk, plan
    run_fused_plan(kernels, small, plan, 16)


def test_fused_misaligned_ids_take_the_scalar_loads(kernels: EmulatedKernels) -> None:
    case = make_case(32, 2, 1, "non_local", rows_per_rank=3000, top_k=4, seed=25)
    storage = torch.zeros(case.ids.numel() + 1, dtype=torch.int32)
    storage[1:] = case.ids.reshape(-1)
    shifted = storage[1:].view(case.ids.shape)  # 4 bytes past a 16-byte boundary
    assert shifted.data_ptr() % 16 != 0
    odd = Case(case.placement, case.rank, case.local, case.sentinel, shifted, case.real_rows)
    got, plan = run(kernels, odd, 16, path="grid")
    assert plan.fused
    assert_matches(got, reference(case, 16), 16)


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


@pytest.mark.parametrize("path", ["warp", "block", "grid"])
def test_rank_without_local_experts_and_empty_batches(kernels: EmulatedKernels, path: str) -> None:
    case = make_case(4, 8, 6, "negative", rows_per_rank=3, top_k=2, seed=6)  # ranks 4..7 own no expert
    assert case.local.count == 0
    got, _ = run(kernels, case, 16, path=path)
    assert_matches(got, reference(case, 16), 16)
    empty = make_case(64, 2, 0, "non_local", rows_per_rank=0, top_k=8, seed=7)
    got, _ = run(kernels, empty, 16, path=path)
    assert_matches(got, reference(empty, 16), 16)
    assert got.aligned.sorted_slot_ids.numel() == 0 and int(got.aligned.num_slots_post_padded) == 0


def test_fused_grid_of_one_block_writes_the_whole_tail(kernels: EmulatedKernels) -> None:
    """A one-block grid_fused (16 warps) with a tail of 31 pieces: every piece must have a warp to serve it (the
    first version kept 32 tail queues and left queues 16-31 unwritten on one block, GPU run 39)."""
    case = make_case(256, 1, 0, "out_of_range", rows_per_rank=24, top_k=8, seed=39)
    # 192 slots on 4 of the 256 local experts: capacity 192 x 64, total 4 x 64 (a tail of 23 pieces)
    ids = torch.randint(0, 4, case.ids.shape, generator=torch.Generator().manual_seed(39), dtype=case.ids.dtype)
    case = Case(case.placement, case.rank, case.local, case.sentinel, ids, case.real_rows)
    got, plan = run(kernels, case, 64, path="grid")
    assert plan.fused and plan.grid_blocks == 1 and plan.capacity - int(got.aligned.num_slots_post_padded) > 16 * 512
    assert_matches(got, reference(case, 64), 64, "one-block grid_fused, 256 local experts, block_m=64")


def test_fused_grid_refuses_misaligned_sync_words(kernels: EmulatedKernels) -> None:
    """grid_fused keeps a 64-bit barrier count in ``done``: buffers whose ``done`` is not 8-byte aligned are
    refused with a message, before any launch."""
    case = make_case(64, 1, 0, "out_of_range", rows_per_rank=40, top_k=8, seed=7)  # no map
    plan = plan_for(*case.ids.shape, case.ids.dtype, 16, case.local.count, MapChoice(MAP_NONE, 0), "grid",
                    num_sms=kernels.num_sms)
    assert plan.fused
    buffers, _ = guarded_buffers(plan, "cpu")
    store = torch.zeros(buffers.done.numel() + 1, dtype=torch.int32)
    shifted = dataclasses.replace(buffers, done=store[1:])  # 4 bytes past an aligned allocation
    launches = len(kernels.launches)
    with pytest.raises(ValueError, match="8-byte aligned"):
        launch(kernels, plan, case.ids.contiguous(), None, MapChoice(MAP_NONE, 0), case.local.first, False, shifted)
    assert len(kernels.launches) == launches


# (path, rows per rank of 4, lanes, kernel); the cluster kernel with clusters, at 4 x 300 x 4 = 4800 slots
@pytest.mark.parametrize("path, rows_per_rank, lanes, kernel", [
    ("warp", 8, True, "lane_preprocess"), ("warp", 30, True, "warp_preprocess"),
    ("block", 50, True, "block_lane_preprocess"), ("block", 50, False, "block_preprocess"),
    ("block", 300, True, "cluster_lane_preprocess"), ("grid", 50, True, "grid_fused")])
@pytest.mark.parametrize("map_in", ["shared", "global"])
def test_faithful_reproduces_the_misrouting_that_safe_counts(kernels: EmulatedKernels, path: str, rows_per_rank: int,
                                                             lanes: bool, kernel: str, map_in: str) -> None:
    max_cluster = 16 if kernel == "cluster_lane_preprocess" else 0
    case = make_case(32, 4, 0, "negative", rows_per_rank=rows_per_rank, top_k=4, seed=8)
    padding = case.ids == -1
    assert bool(padding.any())
    safe, plan = run(kernels, case, 16, path=path, map_in=map_in, lanes=lanes, max_cluster=max_cluster)
    assert plan.kernel_names == (kernel,)
    assert int(safe.invalid_count) == int(padding.sum()) and bool((safe.local_ids[padding] == -1).all())
    faithful, _ = run(kernels, case, 16, mode="faithful", path=path, map_in=map_in, lanes=lanes,
                      max_cluster=max_cluster)
    assert faithful.invalid_count is None
    # The emulator reads 0 below the table, as the zero head does for the global map and as the H100's reserved
    # shared memory usually does (not always: GPU runs 69-73): every padding slot becomes a slot of local expert 0.
    assert bool((faithful.local_ids[padding] == 0).all())
    assert torch.equal(faithful.local_ids[~padding], safe.local_ids[~padding])
    assert int(faithful.expert_counts[0]) == int(safe.expert_counts[0]) + int(padding.sum())
    assert_layout_valid(faithful, 16)


# --- the one-warp decode kernels -----------------------------------------------------------------------------

# N*K at and around the slots-per-lane steps (32, 128: also lane_preprocess's bound) and warp_preprocess's
# bound (512), and 0.
WARP_SIZES = [0, 1, 7, 31, 32, 33, 127, 128, 129, 300, 511, 512]
# (sentinel, experts, ep_size): 32 and 64 local experts (lane_preprocess up to 128 slots, one or two experts per
# lane) with a map; 24, 40 and 65 without one (either side of 32 and past the lane kernels' 64); 128 with a map
# (warp_preprocess at every size).
WARP_LAYERS = [("non_local", 256, 8), ("guard_slot", 256, 4), ("out_of_range", 24, 1), ("out_of_range", 40, 1),
               ("out_of_range", 65, 1), ("negative", 256, 8), ("negative", 512, 4)]


@pytest.mark.parametrize("nk", WARP_SIZES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_warp_kernel_sizes_sentinels_and_maps(kernels: EmulatedKernels, nk: int, dtype: torch.dtype) -> None:
    """path=warp up to its 512-slot bound, on both one-warp kernels; every sentinel, the map in shared/global
    memory or absent, several block_m, random ids, poisoned and guarded outputs, against the torch reference."""
    for j, (sentinel, num_experts, ep) in enumerate(WARP_LAYERS):
        placement, local, value = make_local(num_experts, ep, ep - 1, sentinel)
        gen = torch.Generator().manual_seed(nk * 31 + j * 7 + (dtype == torch.int64))
        ids, real = make_ids(num_experts, 1, nk, 1, value, gen, dtype)  # nk slots, one row each
        case = Case(placement, ep - 1, local, value, ids.reshape(-1, 1), real)
        lanes = nk <= LANE_MAX_SLOTS and local.count <= LANE_MAX_LOCAL
        kernel = "lane_preprocess" if lanes else "warp_preprocess"
        for map_in in ("shared", "global") if local.expert_map is not None else ("auto",):
            for block_m in (None, 1, 16, 48):
                got, plan = run(kernels, case, block_m, map_in=map_in, path="warp")
                assert plan.path == "warp" and plan.kernel_names == (kernel,)
                assert kernels.launches[-1][0].startswith(kernel + "<") and kernels.launches[-1][2] == 32
                what = f"nk={nk} {dtype} {sentinel} E={num_experts} {map_in} block_m={block_m}"
                assert_matches(got, reference(case, block_m), block_m, what)
                if block_m:
                    assert_layout_valid(got, block_m)
                if sentinel == "negative" and block_m is None:
                    assert int(got.invalid_count) == int((case.ids == -1).sum()), what


@pytest.mark.parametrize("num_local", [1, 2, 17, 32, 33, 50, LANE_MAX_LOCAL])
@pytest.mark.parametrize("nk", [5, LANE_MAX_SLOTS])
def test_lane_kernel_every_slot_local(kernels: EmulatedKernels, num_local: int, nk: int) -> None:
    """lane_preprocess with every slot local (no map): a lane's expert taking whole chunks, blocks that span
    chunks, every lane an expert (32, 64: two per lane) or most lanes none (1, 2, 33): counts, starts, block
    ids."""
    case = make_case(num_local, 1, 0, "out_of_range", rows_per_rank=nk, top_k=1, seed=nk + num_local)
    for block_m in (1, 3, 16, 64):
        got, plan = run(kernels, case, block_m)
        assert plan.kernel_names == ("lane_preprocess",) and plan.ipt == (1 if nk <= 32 else 4)
        assert plan.experts_per_lane == (1 if num_local <= 32 else 2)
        assert_matches(got, reference(case, block_m), block_m, f"num_local={num_local} nk={nk} block_m={block_m}")
        assert_layout_valid(got, block_m)


@pytest.mark.parametrize("num_local", [33, 64])
@pytest.mark.parametrize("nk", [1, 5, 32])
def test_block_lane_kernel_on_one_warp_of_slots(kernels: EmulatedKernels, num_local: int, nk: int) -> None:
    """path=block with at most 32 slots and two experts per lane: one warp, and shared memory for one warp's
    row (the first version launched a warp per 32 experts with shared memory for one row: the emulator's
    guard words and the GPU, an illegal address, both caught the overflow)."""
    case = make_case(num_local, 1, 0, "out_of_range", rows_per_rank=nk, top_k=1, seed=nk * 100 + num_local)
    for block_m in (None, 16):
        got, plan = run(kernels, case, block_m, path="block")
        assert plan.kernel_names == ("block_lane_preprocess",) and plan.experts_per_lane == 2
        assert plan.block_threads == 32
        assert_matches(got, reference(case, block_m), block_m, f"num_local={num_local} nk={nk} block_m={block_m}")


@pytest.mark.parametrize("num_local", [1, 31, 33, 64, 129, WARP_MAX_LOCAL])
def test_warp_kernel_expert_ownership_per_lane(kernels: EmulatedKernels, num_local: int) -> None:
    """1..8 experts per lane (ceil(num_local / 32)), no map, every slot local: counts, starts, block ids."""
    case = make_case(num_local, 1, 0, "out_of_range", rows_per_rank=WARP_MAX_SLOTS // 4, top_k=4, seed=num_local)
    for block_m in (1, 16, 64):
        got, plan = run(kernels, case, block_m, path="warp")
        assert plan.kernel_names == ("warp_preprocess",) and plan.ipt == 16
        assert_matches(got, reference(case, block_m), block_m, f"num_local={num_local} block_m={block_m}")
        assert_layout_valid(got, block_m)


def test_warp_kernel_bounds_fall_back_to_the_block(kernels: EmulatedKernels) -> None:
    case = make_case(WARP_MAX_LOCAL + 1, 1, 0, "out_of_range", rows_per_rank=10, top_k=4, seed=30)
    got, plan = run(kernels, case, 16)
    assert plan.path == "block"
    assert_matches(got, reference(case, 16), 16)
    case = make_case(256, 8, 0, "non_local", rows_per_rank=WARP_MAX_SLOTS // 64 + 1, top_k=8, seed=31)  # 576 slots
    got, plan = run(kernels, case, 16)
    assert plan.path == "block"
    assert_matches(got, reference(case, 16), 16)


def test_warp_kernel_replays_into_the_same_buffers(kernels: EmulatedKernels) -> None:
    case = make_case(256, 8, 2, "negative", rows_per_rank=6, top_k=8, seed=32, dtype=torch.int64)
    got, plan = run(kernels, case, 16, launches=3, path="warp")
    assert plan.path == "warp"
    assert_matches(got, reference(case, 16), 16)
