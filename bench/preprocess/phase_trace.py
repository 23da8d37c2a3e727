"""Where one preprocess call spends its time inside the kernel: per-phase timestamps of block 0, thread 0.

The kernels are compiled with ``-DHC_TRACE``: every ``HC_MARK(i)`` in ``csrc/preprocess.cu`` then stores
clock64() and %globaltimer of block 0's thread 0 (after a block barrier where there is one, so the mark
is when the whole block got there). Per size (routing as in `bench_preprocess.py`), the call runs
``--reps`` times behind a long sleep kernel (so host launch cost is hidden) with and without an L2 flush;
the median time of every mark since mark 0 is printed, in nanoseconds (cycles scaled by the globaltimer
span of the same run), next to the median CUDA-event time of the whole call. What happens before mark 0
(launch, block scheduling) is the event time minus the last mark.

With several blocks, ``--per-block`` also prints how every mark spreads over the grid: per block, the time of
the mark since the grid's earliest mark 0 (that block's %globaltimer at its mark 0, plus its own clock64 since
then), as min / median / max over the blocks (each the median over the repetitions). A wide max at the end of
phase 1 is load imbalance; the barrier mark then shows how long the early blocks waited. The JSON row then
also holds every block's SM id and median mark times (``per_block``), to see which blocks are slow.

    python3 bench/preprocess/phase_trace.py --sizes 8 512 2048 4096 8192 16384 1048576 8388608 --out trace.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy
import torch
from bench_preprocess import BLOCK_M, EP, append_jsonl, bench_stages, check, routed_ids
from moe_plugin_cupy_preprocess import jit, plan

MARKS = 32
TRACE_BLOCKS = 1024  # HC_TRACE_BLOCKS in csrc/preprocess.cu
# What each mark follows, per kernel (csrc/preprocess.cu).
MARK_NAMES = {
    "lane_preprocess": ["start", "ids+map loaded, sorted filled", "mapped, ballots, counts", "group starts+block ids",
                        "placed+tail"],
    "warp_preprocess": ["start", "ids+map loaded, sorted filled", "mapped+chunk counts", "expert scan",
                        "group starts+block ids", "placed+tail"],
    "block_lane_preprocess": ["start", "ids+map loaded", "mapped+counted (barrier)",
                              "warp 0 column scan+group starts (barrier)", "padding, block ids, fills, placed"],
    "cluster_lane_preprocess": ["start", "ids+map loaded", "mapped+counted (barrier)",
                                "block totals pushed (cluster barrier)", "group starts (barrier)",
                                "padding, block ids, fills, placed"],
    "block_preprocess": ["start", "map copied", "mapped", "counted", "row prefixes", "group scan", "ranked",
                         "padding (window > 32)", "block ids (window > 32)", "window sync", "sorted fill", "block id fill", "end"],
    "grid_fused": ["start", "map copied", "phase 1 (own warp)", "phase 1 (block)", "hist published",
                   "grid barrier", "phase 2", "phase 3 starts", "ranked (own warp)", "staged copied out",
                   "tail (own warp)", "end"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="N*K values")
    parser.add_argument("--path", default="auto", help="the backend's path option (auto, warp, block, grid)")
    parser.add_argument("--block-owned", type=int, help="block path: slots per block (plan.BLOCK_OWNED_SLOTS)")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--ep", type=int, default=EP, help=f"expert-parallel ranks (default {EP})")
    parser.add_argument("--per-block", action="store_true", help="also the spread of every mark over the blocks")
    parser.add_argument("--out", help="JSON lines file to write (appended: one line per size and timer)")
    args = parser.parse_args()

    jit.COMPILE_OPTIONS = (*jit.COMPILE_OPTIONS, "-DHC_TRACE")  # before the module is first compiled
    if args.block_owned:
        plan.BLOCK_OWNED_SLOTS = args.block_owned
    import cupy

    ctx, stage, peer, gen = bench_stages(args.path, args.ep)
    trace_ptr = jit._module().get_global("hc_trace")
    trace = cupy.ndarray((2 * MARKS,), dtype=cupy.uint64, memptr=trace_ptr)
    trace_blocks = cupy.ndarray((TRACE_BLOCKS, MARKS, 2), dtype=cupy.uint64,
                                memptr=jit._module().get_global("hc_trace_blocks"))
    smids = cupy.ndarray((TRACE_BLOCKS,), dtype=cupy.uint32, memptr=jit._module().get_global("hc_trace_smid"))
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    for nk in args.sizes:
        ids = routed_ids(nk, int(ctx.sentinel), gen, args.ep)
        buffers = stage.make_buffers(ids.shape[0], ids.shape[1], BLOCK_M)
        check(stage.preprocess_into(ids, buffers), peer.preprocess(ids, BLOCK_M))
        kernel = buffers.plan.kernel_names[-1].split("<")[0]
        for flushed in (False, True):
            per_mark: dict[int, list[float]] = {}
            event_us, ghz = [], []
            spread: dict[int, list[tuple[float, float, float]]] = {}
            block_times: list = []  # per repetition: [block][mark] ns since the grid's first mark 0 (nan: not reached)
            for rep in range(args.reps + 5):
                trace.fill(0)
                trace_blocks.fill(0)
                cupy.cuda.Device().synchronize()
                if flushed:
                    flush.zero_()
                torch.cuda._sleep(100_000)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                stage.preprocess_into(ids, buffers)
                end.record()
                end.synchronize()
                if rep < 5:
                    continue
                event_us.append(start.elapsed_time(end) * 1e3)
                t = trace.get().astype("int64")
                clk, gt = t[:MARKS], t[MARKS:]
                hit = [i for i in range(MARKS) if clk[i] != 0]
                last = hit[-1]
                ns_per_cycle = (gt[last] - gt[0]) / max(1, clk[last] - clk[0])
                if ns_per_cycle > 0:
                    ghz.append(1 / ns_per_cycle)
                for i in hit:
                    per_mark.setdefault(i, []).append(float((clk[i] - clk[0]) * ns_per_cycle))
                if args.per_block and buffers.plan.grid_blocks > 1:
                    times = block_mark_times(trace_blocks, buffers.plan.grid_blocks, ns_per_cycle)
                    block_times.append(times)
                    for i, stats in mark_spread(times).items():
                        spread.setdefault(i, []).append(stats)
            names = MARK_NAMES.get(kernel, [])
            marks = {(names[i] if i < len(names) else str(i)): statistics.median(v) for i, v in sorted(per_mark.items())}
            row = {"num_slots": nk, "ep": args.ep, "kernel": kernel, "blocks": buffers.plan.grid_blocks,
                   "flushed": flushed,
                   "event_us": statistics.median(event_us),
                   "sm_ghz": statistics.median(ghz) if ghz else None, "marks_ns": marks}
            if spread:
                row["blocks_ns"] = {(names[i] if i < len(names) else str(i)): [statistics.median(s[j] for s in v)
                                                                               for j in range(3)]
                                    for i, v in sorted(spread.items())}
                reached = sorted(spread)
                median = numpy.nanmedian(numpy.stack(block_times)[:, :, reached], axis=0)
                row["per_block"] = {"marks": [names[i] if i < len(names) else str(i) for i in reached],
                                    "smid": smids.get()[:len(median)].tolist(),
                                    "marks_ns": [[None if numpy.isnan(x) else round(float(x)) for x in b] for b in median]}
            print(f"N*K={nk:>8} {kernel:>16} x{row['blocks']:<3} {'flushed' if flushed else 'hot':>7} event {row['event_us']:6.2f} us, SM {row['sm_ghz'] or 0:.2f} GHz | "
                  + "  ".join(f"{k} {v:.0f}" for k, v in marks.items()), flush=True)
            for name, (lo, mid, hi) in row.get("blocks_ns", {}).items():
                print(f"    {name:>28}: blocks min {lo:8.0f}  median {mid:8.0f}  max {hi:8.0f} ns", flush=True)
            append_jsonl(args.out, row)
        del ids, buffers
    return 0


def block_mark_times(trace_blocks, blocks: int, ns_per_cycle: float) -> numpy.ndarray:
    """[block, mark]: ns since the grid's earliest mark 0 (block b's %globaltimer at its mark 0, then its own
    clock64 since); nan where the block did not reach the mark."""
    t = trace_blocks[:min(blocks, TRACE_BLOCKS)].get().astype("int64")  # [block, mark, (clock, globaltimer)]
    start_gt = t[:, 0, 1:2]
    times = (start_gt - start_gt.min() + (t[:, :, 0] - t[:, 0:1, 0]) * ns_per_cycle).astype("float64")
    times[t[:, :, 0] == 0] = numpy.nan
    return times


def mark_spread(times: numpy.ndarray) -> dict[int, tuple[float, float, float]]:
    """Per mark some block reached: (min, median, max) over the blocks that reached it."""
    out = {}
    for i in range(times.shape[1]):
        reached = times[:, i][~numpy.isnan(times[:, i])]
        if reached.size:
            out[i] = (float(reached.min()), float(numpy.median(reached)), float(reached.max()))
    return out


if __name__ == "__main__":
    sys.exit(main())
