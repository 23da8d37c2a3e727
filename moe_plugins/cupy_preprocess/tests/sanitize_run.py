"""A small safe-mode workload for compute-sanitizer (memcheck, racecheck, initcheck, synccheck).

Runs every kernel of the cupy preprocess (both one-warp kernels, the block path with one and with several blocks and
as one thread-block cluster of 8 and of 16 blocks, the single-launch grid_fused with one and with two grid barriers,
with each map mode, with lists too short for a warp's local slots, with blocks whose local slots do not all fit the
stage (those past it stored straight to sorted) and with keyed and offset stage entries, the three split grid
kernels for many local experts, map in shared memory, in global memory and absent, int32 and int64 ids, a rank
without local experts) on fresh random inputs, and compares each result with the torch reference computed on the
CPU (so that only our kernels and torch's copies run on the GPU). Each run writes `preprocess_into` buffers that
have allocations of their own (`separate_buffers`), so that memcheck knows every buffer's bounds and initcheck its
unwritten words. Exits 1 on a mismatch; the sanitizer's own exit code (``--error-exitcode``) reports what it found.

    compute-sanitizer --tool racecheck --error-exitcode 9 python3 moe_plugins/cupy_preprocess/tests/sanitize_run.py
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from preprocess_testlib import assert_matches, context, make_case, reference, separate_buffers  # noqa: E402

from moe_plugin_cupy_preprocess.backend import CupyPreprocess  # noqa: E402
from moe_plugin_cupy_preprocess.plan import CLUSTER_SIZES, GRID_WARPS, PLACE_QUEUE, plan_for  # noqa: E402

CASES = [
    # (E, ep_size, rank, sentinel, rows per rank, top_k, dtype, options)
    (256, 8, 1, "non_local", 6, 8, torch.int32, {"path": "warp"}),  # warp_preprocess (384 slots), shared map
    (512, 4, 3, "negative", 4, 8, torch.int64, {"map_in": "global"}),  # warp_preprocess (auto, 128 slots, 128
    # local experts), global map
    (256, 8, 7, "negative", 2, 8, torch.int64, {"map_in": "global"}),  # lane_preprocess (128 slots), global map
    (256, 8, 1, "guard_slot", 1, 8, torch.int32, {}),  # lane_preprocess (64 slots), shared map
    (24, 1, 0, "out_of_range", 20, 1, torch.int32, {}),  # lane_preprocess (20 slots), no map
    (256, 1, 0, "out_of_range", 8, 8, torch.int32, {}),  # warp_preprocess, 8 experts per lane (256 local), no map
    (256, 4, 2, "guard_slot", 4, 8, torch.int32, {}),  # lane_preprocess, two experts per lane (64 local, 128 slots)
    (256, 8, 1, "non_local", 40, 8, torch.int32, {"clusters": False}),  # block_lane_preprocess (3 blocks), shared map
    (256, 8, 7, "negative", 40, 8, torch.int64, {"clusters": False}),  # block_lane_preprocess, invalid ids counted
    (256, 8, 1, "non_local", 32, 8, torch.int32, {}),  # cluster_lane_preprocess (2048 slots, 8 blocks), shared map
    (256, 8, 5, "negative", 100, 8, torch.int64, {"map_in": "global"}),  # cluster_lane (16 blocks where they fit),
    # global map, invalid ids
    (256, 4, 2, "non_local", 1250, 8, torch.int32, {"path": "block"}),  # cluster_lane: 40000 slots, 4 per thread
    # on 16 blocks (8 on 8), two experts per lane
    (256, 8, 6, "guard_slot", 1100, 8, torch.int32, {}),  # cluster_lane: 70400 slots, 16 blocks, 8 per thread
    # (where 16-block clusters fit; else grid_fused)
    (24, 1, 0, "out_of_range", 100, 8, torch.int32, {}),  # block_lane_preprocess, no map
    (64, 1, 0, "out_of_range", 500, 8, torch.int32, {}),  # cluster_lane_preprocess, two experts per lane, no map
    (256, 4, 1, "non_local", 1, 8, torch.int32, {"path": "block"}),  # block_lane, 64 local experts, one warp
    (256, 8, 2, "guard_slot", 700, 8, torch.int32, {"path": "grid"}),  # grid_fused, shared map, keys in smem
    (256, 8, 5, "negative", 8000, 8, torch.int32, {}),  # grid_fused at 512K slots (128 blocks), invalid ids
    (20_000, 64, 3, "non_local", 700, 8, torch.int64, {"path": "grid"}),  # grid_fused, global map, 312 experts
    # x 88 blocks > 8192: two grid barriers
    (20_000, 8, 3, "non_local", 700, 8, torch.int64, {"path": "grid"}),  # 2500 experts: split kernels, global map
    (3000, 2, 1, "non_local", 1500, 4, torch.int32, {"path": "grid"}),  # split kernels, two expert windows
    (3000, 2, 1, "non_local", 1500, 4, torch.int32, {"path": "block"}),  # two windows, 12 blocks, a row per warp
    (256, 8, 0, "negative", 250, 8, torch.int64, {"path": "block", "clusters": False}),  # block_lane: 16000 int64
    # slots, 16 blocks
    (256, 8, 3, "guard_slot", 100, 8, torch.int32, {"path": "block", "clusters": False}),  # block_lane: 6400 slots,
    # 7 blocks, ipt 8
    (256, 8, 0, "negative", 250, 8, torch.int64, {"path": "block"}),  # cluster_lane: 16000 int64 slots, ipt 2
    (512, 4, 0, "negative", 1000, 4, torch.int64, {"path": "block"}),  # block_preprocess, 128 local experts: 16000
    # int64 slots, 16 blocks, ipt 16
    (4, 8, 6, "negative", 30, 2, torch.int32, {"path": "grid"}),  # grid_fused without a local expert
    (64, 1, 0, "out_of_range", 5000, 8, torch.int32, {"path": "grid"}),  # grid_fused, no map (40K slots, 10 blocks)
    # grid_fused with its lists cut to PLACE_QUEUE entries: 1.1M slots (137 blocks, 512-slot warp segments), 3/4
    # of them local: every warp's list fills up and phase 3 re-reads the rest of its local slots from local_ids
    # (into the block's stage, which keeps its whole chunk)
    (64, 1, 0, "out_of_range", 140_000, 8, torch.int32, {"path": "grid", "least_lists": True}),
    # grid_fused at 1.09M slots (133 blocks of 8192) with a stage of 300 entries: the blocks of padding rows stage
    # all of theirs, the others (~1000 local slots each) stage 300 and store the rest straight to sorted
    (256, 8, 2, "non_local", 17_000, 8, torch.int32, {"stage_cap": 300}),
    # grid_fused planned for one SM: 2 blocks of 65536 slots (128000, every expert local), whose keyed stage
    # would not hold them: offset entries, and each block's slots past its stage stored straight to sorted
    (16, 1, 0, "negative", 8000, 16, torch.int32, {"path": "grid", "one_sm": True}),
]


def main() -> int:
    start = time.perf_counter()
    seed = time.time_ns() % 1_000_000
    kernels_run: set[str] = set()
    widest = 0  # the widest thread-block cluster the device holds (0: none)
    for i, (e, ep, rank, sentinel, rows, k, dtype, options) in enumerate(CASES):
        case = make_case(e, ep, rank, sentinel, rows, k, seed=seed + i, dtype=dtype)
        local = case.local if case.local.expert_map is None else case.local.with_map(case.local.expert_map.cuda())
        ctx = context(case.placement, rank, local, "cuda:0", top_k=k, sentinel=case.sentinel)
        least_lists = options.get("least_lists", False)
        stage_cap = options.get("stage_cap")
        one_sm = options.get("one_sm", False)
        stage = CupyPreprocess(ctx, mode="safe", **{o: v for o, v in options.items()
                                                    if o not in ("least_lists", "stage_cap", "one_sm")})
        ids = case.ids.cuda()
        for block_m in (None, 16):
            plan = stage.plan(ids.shape[0], ids.shape[1], ids.dtype, block_m)
            if one_sm:
                plan = plan_for(*ids.shape, ids.dtype, block_m, case.local.count, stage.map, "grid",
                                stage.kernels.smem_optin, 1, stage.kernels.fused_occupancy("int32"))
            if least_lists and plan.fused and block_m:  # the buffers' plan is what preprocess_into launches
                plan = dataclasses.replace(plan, list_cap=PLACE_QUEUE)
                if PLACE_QUEUE < plan.chunk // GRID_WARPS:
                    kernels_run.add("grid_fused re-read past a full list")
            if stage_cap is not None and plan.fused and block_m:
                plan = dataclasses.replace(plan, stage_cap=min(stage_cap, plan.stage_cap))
            if plan.fused and block_m:  # blocks whose local slots all fit the stage, and blocks with slots past it
                local = (reference(case, None).local_ids.reshape(-1) >= 0).int()
                per_block = [int(local[g * plan.chunk:(g + 1) * plan.chunk].sum()) for g in range(plan.grid_blocks)]
                if any(n <= plan.stage_cap for n in per_block) and plan.stage_cap:
                    kernels_run.add("grid_fused staged")
                if any(n > plan.stage_cap for n in per_block):
                    kernels_run.add("grid_fused stored straight")
                if plan.stage_cap:
                    kernels_run.add(f"grid_fused stage of {plan.stage_type}")
            kernels_run.update(plan.kernel_names)
            if plan.cluster:
                kernels_run.add(f"cluster_lane_preprocess {plan.grid_blocks} blocks")
            widest = max(widest, stage.max_cluster)
            if plan.experts_per_lane == 2:
                kernels_run.add(f"{plan.kernel_names[0]} two experts per lane")
            if plan.fused and plan.two_phase:
                kernels_run.add("grid_fused two-phase")
            if plan.fused and block_m:  # grid_fused's phase-1 loop is instantiated per map mode
                kernels_run.add(f"grid_fused map mode {plan.map.mode}")
            got = stage.preprocess_into(ids, separate_buffers(plan, "cuda:0"))
            torch.cuda.synchronize()
            try:
                assert_matches(got, reference(case, block_m), block_m, f"case {i} block_m={block_m}")
            except AssertionError as exc:
                print(f"MISMATCH case {i} {case.local.count} local experts {options}: {exc} (seed {seed})")
                return 1
    missing = {"lane_preprocess", "lane_preprocess two experts per lane", "warp_preprocess", "block_lane_preprocess",
               "block_lane_preprocess two experts per lane", "cluster_lane_preprocess",
               "cluster_lane_preprocess two experts per lane", "block_preprocess", "grid_fused", "grid_fused two-phase",
               "grid_count", "grid_scan", "grid_place", "grid_fused map mode 0", "grid_fused map mode 1",
               "grid_fused map mode 2", "grid_fused re-read past a full list", "grid_fused staged",
               "grid_fused stored straight", "grid_fused stage of unsigned short", "grid_fused stage of unsigned",
               *(f"cluster_lane_preprocess {b} blocks" for b in CLUSTER_SIZES if b <= widest)} - kernels_run
    if missing:
        print(f"MISMATCH: the workload did not run {sorted(missing)}")
        return 1
    print(f"sanitize workload OK: {len(CASES)} cases x 2, seed {seed}, kernels {sorted(kernels_run)}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
