"""Benchmark: preprocess=cupy against the host's torch reference (lookup + counts + aligned layout).

One GPU, one process. For N*K from 8 to 8M (DeepSeek-V3-like routing: E = 256 experts, top-8, EP 8 (`--ep`),
rank 0 holds 32 experts through an expert map, block_m = 16, int32 ids, a quarter of the rows padding
with the non_local sentinel; with ``--ep 1`` no map and the out_of_range sentinel), every size on fresh random ids:

- ``ours_us``: the cupy backend into preallocated buffers (`preprocess_into`, what a CUDA graph runs);
  ``peer_us``: the torch reference; ``launch_us``: an empty CuPy kernel launched the same way. All are
  the median GPU time between CUDA events (`triton.testing.do_bench`, which flushes L2 between runs).
- ``ours_hot_us`` / ``launch_hot_us``: the same without the L2 flush, as in the pipeline, where the ids
  were just written by the dispatch (reported next to the flushed numbers, not instead of them).
- ``copy_floor_us`` (``copy_floor_graph_us``): a kernel that only copies the ids to an int32 output, launched
  the same way (the lower of two medians): the least any preprocess can take under the same timer (it must
  read the ids and write the local ids), to read the decode goal against.
- ``*_graph_us``: the same work captured 20 times in a CUDA graph, per call (launch gaps shrink).
- ``*_wall_us``: host wall time per call in a loop (CPU launch overhead included).
- ``gbps``: the bytes the preprocess must move (`plan.moved_bytes`: ids read once, every output written
  once) over ``ours_us``; ``roofline_frac`` = gbps / ``copy_gbps``, the device-to-device copy bandwidth
  measured in the same run (bytes read + written over a 1 GiB copy). This is the goal's measure, the same
  for every design. ``copy_same_bytes_us``: torch's device-to-device copy of exactly that many bytes (half
  read, half written), same timer; ``copy_same_bytes_frac`` = its time / ``ours_us``, i.e. how close the
  preprocess comes to a plain copy of what it must move at this size (launch and latency included, which
  a 1 GiB copy hides). ``design_bytes`` / ``design_frac``: the traffic this design causes by its own model
  (`plan.design_bytes`: with grid_fused's keys in shared memory it equals the must-move bytes plus the
  per-block counts), to tell a slow kernel from extra traffic. ``launch_then_copy_frac``: the share a kernel
  would show that took an empty kernel's time and then moved the bytes at the 1 GiB copy rate: a model of the
  ceiling, not a proof (writes that stay in L2 could go faster; every copy measured here at 1M went slower).
- ``kernels``: the launches of one call (``cluster_lane_preprocess`` from 1025 to 128K slots on sm_90+, as 16
  blocks past 2048 slots where the device holds such clusters, else 8 up to 64K; ``grid_fused`` alone above that
  when the device allows cooperative launches and the experts fit one window), with ``grid_blocks`` and
  ``keys_in_smem``. ``path_compare``: every kernel that can run a size, same process (``block_no_cluster``:
  block_lane_preprocess's independent blocks; ``block_cluster8`` / ``block_cluster16``: the cluster kernel as
  the other cluster size; ``*_no_lanes``: the kernels before lanes).

Each size is checked against the reference before it is timed. Writes JSON (``--out``) and prints a table
and the goals: decode sizes (N*K <= 16K) within 1.2x of the empty launch, N*K >= 1M at least 70% of the
copy bandwidth, faster than torch everywhere. The decode goal is judged under the CUDA-event timer; the goals
also give the worst ratio under the other two timers (CUDA graph, host wall time), and what a bare copy kernel
reaches under the same timer.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from moe_plugin_cupy_preprocess.backend import CupyPreprocess
from moe_plugin_cupy_preprocess.launch import Step, launch
from moe_plugin_cupy_preprocess.buffers import PreprocessBuffers
from moe_plugin_cupy_preprocess.plan import (BLOCK_MAX_SLOTS, CLUSTER_SIZES, WARP_MAX_SLOTS, cluster_max_slots,
                                             design_bytes, moved_bytes, plan_for)

from hostcore import cuda_graphs
from hostcore.backends.preprocess_torch import TorchPreprocess
from hostcore.errors import ConfigError
from hostcore.hookspecs import BuildContext
from hostcore.placement import ExpertPlacement

E, EP, RANK, TOP_K, BLOCK_M = 256, 8, 0, 8, 16
SIZES = [8, 64, 512, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 1 << 20, 1 << 22, 1 << 23]
PATH_COMPARE = [8, 64, 128, 256, 512, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
# warp_preprocess (<= 512 slots) is compared with block_preprocess where it runs; block vs grid above that (past
# 16384 slots the block path is the cluster kernel's alone, up to the widest cluster's `cluster_max_slots`).
BREAKDOWN = [8, 512, 16384, 65536, 1 << 20, 1 << 23]
DECODE_MAX, BANDWIDTH_MIN = 16384, 1 << 20


def median_us(fn: Callable[[], Any], flush: bool = True) -> float:
    """Median GPU time of one call, in microseconds, between CUDA events around it.

    ``flush=True`` (the goal's measure): L2 flushed before every call (`triton.testing.do_bench`).
    ``flush=False`` ("hot"): no flush, so the inputs are in L2 as when the dispatch kernel has just
    written them; a ~0.5 ms sleep kernel before each call keeps the host ahead of the GPU (so host launch
    cost is not counted either way) without touching memory. (A short one does not: run 6 measured the
    empty launch at 14 us "hot" behind a 4 MiB memset, and run 65, on a busy host, at 110 us behind a ~50 us
    sleep, because the GPU finished it before the host had queued the call.)
    """
    if flush:
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            return float(do_bench(fn, warmup=10, rep=50, return_mode="median")) * 1e3
    flush_buffer = torch.empty(64 << 20, dtype=torch.int32, device="cuda") if flush else None
    times = []
    for i in range(110):
        if flush_buffer is not None:
            flush_buffer.zero_()
        else:
            torch.cuda._sleep(1_000_000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 10:
            times.append(start.elapsed_time(end))
    return statistics.median(times) * 1e3


def graph_us(fn: Callable[[], Any], calls: int = 20, replays: int = 15) -> float | None:
    """GPU time per call with ``calls`` calls captured in one CUDA graph (median over replays)."""
    try:
        def many() -> None:
            for _ in range(calls):
                fn()

        graph, _ = cuda_graphs.capture(many)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        return statistics.median(times)
    except Exception as exc:  # report, do not abort the run
        print(f"  graph capture failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def wall_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Host wall time per call in a loop, synchronised at both ends."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def copy_gbps() -> float:
    """Device-to-device copy bandwidth: (bytes read + bytes written) / time for a 1 GiB copy."""
    n = 1 << 28  # int32: 1 GiB
    src = torch.randint(0, 1 << 30, (n,), dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 4 / (us * 1e-6) / 1e9


def kernel_breakdown(stage: CupyPreprocess, ids: torch.Tensor, buffers: Any, reps: int = 20) -> dict[str, float]:
    """Median GPU time of each kernel of one preprocess (events between the launches, L2 flushed first)."""
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    per: dict[str, list[float]] = {}
    for rep in range(reps + 3):
        flush.zero_()
        events: list[tuple[str, torch.cuda.Event]] = []

        def mark(name: str) -> None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            events.append((name, event))

        launch(stage.kernels, buffers.plan, ids, stage.device_map, stage.map, stage.local.first, False, buffers,
               marks=mark)
        torch.cuda.synchronize()
        if rep >= 3:
            for (name, start), (_, end) in zip(events, events[1:]):
                per.setdefault(name, []).append(start.elapsed_time(end) * 1e3)
    return {name: statistics.median(times) for name, times in per.items()}


def routed_ids(nk: int, sentinel: int, gen: torch.Generator, ep: int = EP) -> torch.Tensor:
    """Fresh random received ids [nk / K, K]: random global ids, the last quarter of each source slice padding."""
    rows = max(1, nk // TOP_K)
    k = nk // rows
    ids = torch.randint(0, E, (rows, k), generator=gen, dtype=torch.int32)
    per_source = max(1, rows // ep)
    for s in range(0, rows, per_source):
        real = per_source - per_source // 4
        ids[s + real: s + per_source] = sentinel
    return ids.cuda()


FLOOR_SOURCE = r"""
extern "C" __global__ void copy_floor(const int* __restrict__ ids, int* __restrict__ out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ids[i];
}
"""


@functools.cache
def _copy_floor_handle() -> int:
    import cupy

    return int(cupy.RawModule(code=FLOOR_SOURCE).get_function("copy_floor").kernel.ptr)


def copy_floor_step(ids: torch.Tensor, out: torch.Tensor) -> Step:
    """A launch (same path as the preprocess: a packed `Step` through ``kernels.run``) of a kernel that only
    reads every id and writes one int per slot: the dependency every preprocess has (ids in, local ids
    out) without the map, counts or layout. What it takes is the least any preprocess can take with the
    same timer, so the decode goal's ratio can be read against it."""
    n = ids.numel()
    return Step("copy_floor", _copy_floor_handle(), max(1, -(-n // 256)), 256, 0, [ids.data_ptr(), out.data_ptr(), n])


def check(got: Any, ref: Any) -> None:
    pairs = [(got.local_ids, ref.local_ids), (got.expert_counts, ref.expert_counts),
             (got.aligned.sorted_slot_ids, ref.aligned.sorted_slot_ids),
             (got.aligned.block_expert_ids, ref.aligned.block_expert_ids),
             (got.aligned.num_slots_post_padded, ref.aligned.num_slots_post_padded)]
    for a, b in pairs:
        if not torch.equal(a, b):
            raise SystemExit("MISMATCH between cupy and torch: refusing to time a wrong result")


def bench_context(ep: int = EP) -> BuildContext:
    """The benchmark's layer on GPU 0: rank RANK of ``ep`` ranks over E experts through an expert map, the
    non_local sentinel (shared by this script, profile_preprocess.py and phase_times.py). With ``ep`` 1 every
    expert is local, so there is no non-local id: no map, and the out_of_range sentinel (E)."""
    if not 1 <= ep <= E:
        raise SystemExit(f"--ep must be between 1 and {E} (the ranks that share the {E} experts), got {ep}")
    placement = ExpertPlacement.contiguous(E, ep)
    if ep == 1:
        local, sentinel = placement.local_experts(RANK, use_map=False, device="cuda"), E
    else:
        local = placement.local_experts(RANK, use_map=True, device="cuda")
        sentinel = int((placement.expert_map(RANK) == -1).nonzero()[0])  # non_local
    return BuildContext(rank=RANK, ep_size=ep, device=torch.device("cuda", 0), placement=placement, local=local,
                        hidden_size=7168, top_k=TOP_K, dtype=torch.bfloat16, max_tokens_per_rank=1 << 20,
                        sentinel=sentinel)


def fresh_generator() -> torch.Generator:
    """A CPU generator seeded from the clock: every run times fresh random ids."""
    return torch.Generator().manual_seed(time.time_ns() % (1 << 31))


def bench_stages(path: str = "auto", ep: int = EP) -> tuple[BuildContext, CupyPreprocess, TorchPreprocess,
                                                              torch.Generator]:
    """`bench_context` (``ep`` ranks), a cupy stage with ``path``, the torch reference and a `fresh_generator`: the
    setup of ab_sources.py, profile_preprocess.py, phase_times.py and phase_trace.py."""
    ctx = bench_context(ep)
    return ctx, CupyPreprocess(ctx, path=path), TorchPreprocess(ctx, mode="safe"), fresh_generator()


def launch_then_copy_frac(nbytes: int, launch_us: float, copy_gbps: float) -> float:
    """The share of ``copy_gbps`` shown by a kernel that takes an empty kernel's time (``launch_us``) and then
    moves ``nbytes`` at ``copy_gbps``: where no other work is left, the launch alone keeps small sizes far from
    the copy rate."""
    least_us = launch_us + nbytes / (copy_gbps * 1e3)  # GB/s = 1e3 bytes per microsecond
    return nbytes / (least_us * 1e3) / copy_gbps


def append_jsonl(path: str | None, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line to ``path`` (the scripts' ``--out``); nothing when ``path`` is None."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def same_bytes_copy_us(nbytes: int) -> float:
    """`median_us` of torch's device-to-device copy of ``nbytes`` bytes (half read, half written)."""
    src = torch.empty(max(1, nbytes // 8), dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    return median_us(lambda: dst.copy_(src))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    parser.add_argument("--ep", type=int, default=EP, help=f"expert-parallel ranks over the {E} experts (default "
                        f"{EP}: {E // EP} local experts; 4: {E // 4}, the lane kernels' two experts per lane)")
    args = parser.parse_args()

    ctx = bench_context(args.ep)
    sentinel = int(ctx.sentinel)
    ours = {path: CupyPreprocess(ctx, path=path) for path in ("auto", "warp", "block", "grid")}
    peer = TorchPreprocess(ctx, mode="safe")
    kernels = ours["auto"].kernels

    # The empty kernel goes through the same launch path as the preprocess (a packed Step, kernels.run).
    empty_step = Step("empty_kernel", kernels.handle("empty_kernel"), 1, 1, 0, [0])

    def empty() -> None:
        kernels.run((empty_step,))

    gpu = torch.cuda.get_device_name(0)
    copy = copy_gbps()
    launch = median_us(empty)
    launch_hot = median_us(empty, flush=False)
    launch_graph = graph_us(empty)
    launch_wall = wall_us(empty)
    print(f"{gpu}: copy {copy:.0f} GB/s, empty launch {launch:.2f} us (hot {launch_hot:.2f}, graph {launch_graph:.2f} us, "
          f"wall {launch_wall:.2f} us)")

    gen = fresh_generator()
    rows_out, compare, breakdown = [], [], {}
    for nk in args.sizes:
        ids = routed_ids(nk, sentinel, gen, args.ep)
        stage = ours["auto"]
        buffers = stage.make_buffers(ids.shape[0], ids.shape[1], BLOCK_M)
        check(stage.preprocess_into(ids, buffers), peer.preprocess(ids, BLOCK_M))
        ours_us = median_us(lambda: stage.preprocess_into(ids, buffers))
        peer_us = median_us(lambda: peer.preprocess(ids, BLOCK_M))
        ours_hot_us = median_us(lambda: stage.preprocess_into(ids, buffers), flush=False)
        floor_out = torch.empty_like(ids)
        floor = copy_floor_step(ids, floor_out)
        kernels.run((floor,))
        if not torch.equal(floor_out, ids):
            raise SystemExit("the copy-floor kernel did not copy the ids")
        # The lower of two medians: a floor, and one median of run 77 came out at 29.9 us (8192 slots, against
        # 4.5-5.4 at the sizes around it).
        floor_us = min(median_us(lambda: kernels.run((floor,))) for _ in range(2))
        floor_graph_us = graph_us(lambda: kernels.run((floor,)))
        plan = buffers.plan
        nbytes = moved_bytes(plan)
        same_us = same_bytes_copy_us(nbytes)
        gbps = nbytes / (ours_us * 1e-6) / 1e9
        dbytes = design_bytes(plan)
        row = {"case": f"N*K={nk}", "num_slots": nk, "ours_us": ours_us, "peer": "torch", "peer_us": peer_us,
               "speedup": peer_us / ours_us, "roofline_frac": gbps / copy,
               "launch_then_copy_frac": launch_then_copy_frac(nbytes, launch, copy), "launch_us": launch,
               "ours_hot_us": ours_hot_us, "launch_hot_us": launch_hot, "copy_floor_us": floor_us,
               "copy_floor_graph_us": floor_graph_us, "gbps": gbps, "copy_same_bytes_us": same_us,
               "copy_same_bytes_frac": same_us / ours_us,
               "copy_gbps": copy, "bytes": nbytes, "path": plan.path, "kernels": list(plan.kernel_names),
               "grid_blocks": plan.grid_blocks, "keys_in_smem": plan.keys_in_smem, "two_phase": plan.two_phase,
               "design_bytes": dbytes, "design_frac": dbytes / (ours_us * 1e-6) / 1e9 / copy,
               "ours_graph_us": graph_us(lambda: stage.preprocess_into(ids, buffers)),
               "peer_graph_us": graph_us(lambda: peer.preprocess(ids, BLOCK_M)),
               "launch_graph_us": launch_graph,
               "ours_wall_us": wall_us(lambda: stage.preprocess_into(ids, buffers)),
               "ours_alloc_wall_us": wall_us(lambda: stage.preprocess(ids, BLOCK_M)),
               "peer_wall_us": wall_us(lambda: peer.preprocess(ids, BLOCK_M), calls=50),
               "launch_wall_us": launch_wall}
        rows_out.append(row)
        kind = "fused" if plan.fused else plan.path
        print(f"N*K={nk:>8}  {kind:>5}  ours {ours_us:8.2f} us  torch {peer_us:9.2f} us  "
              f"hot {ours_hot_us:7.2f} us  floor {floor_us:6.2f} us  x{row['speedup']:6.1f}  {gbps:7.1f} GB/s ({row['roofline_frac']:.0%} of copy)  "
              f"design {row['design_frac']:.0%}  graph {row['ours_graph_us'] or float('nan'):.2f} us  "
              f"wall {row['ours_wall_us']:.1f} us (empty {launch_wall:.1f})")
        if nk in BREAKDOWN:
            breakdown[str(nk)] = kernel_breakdown(stage, ids, buffers)
            print("    kernels: " + ", ".join(f"{k} {v:.2f} us" for k, v in breakdown[str(nk)].items()))
        if nk in PATH_COMPARE:
            entry = {"num_slots": nk}
            paths = ("warp", "block") if nk <= WARP_MAX_SLOTS else ("block", "grid")
            if nk > max(BLOCK_MAX_SLOTS, cluster_max_slots(ours["block"].max_cluster)):
                paths = ("grid",)
            timed = []
            for path in paths:
                stage_p = ours[path]
                try:
                    b = stage_p.make_buffers(ids.shape[0], ids.shape[1], BLOCK_M)
                except ConfigError as exc:  # e.g. path=warp with more local experts than one warp handles
                    entry[f"{path}_skipped"] = str(exc)
                    continue
                variants = [(path, b)]
                # A/B in the same process: the cluster kernel against block_lane_preprocess's independent blocks
                # and as the other cluster size, the lane kernels against warp_ / block_preprocess (those stop
                # at BLOCK_MAX_SLOTS).
                others: list[tuple[str, dict[str, Any]]] = []
                if b.plan.cluster:
                    others += [(f"cluster{size}", {"max_cluster": stage_p.max_cluster, "cluster_blocks": size})
                               for size in CLUSTER_SIZES if size != b.plan.grid_blocks and size <= stage_p.max_cluster
                               and nk <= cluster_max_slots(size)]
                if nk <= BLOCK_MAX_SLOTS or path != "block":
                    others += [(name, option) for name, option in (("no_cluster", {"lanes": True}),
                                                                   ("no_lanes", {"lanes": False}))
                               if (b.plan.cluster if name == "no_cluster" else b.plan.lanes)]
                for name, option in others:
                    other = plan_for(*ids.shape, ids.dtype, BLOCK_M, ctx.local.count, stage_p.map, path,
                                     stage_p.kernels.smem_optin, stage_p.kernels.num_sms, **option)
                    variants.append((f"{path}_{name}", PreprocessBuffers.allocate(other, stage_p.device)))
                for name, b in variants:
                    check(stage_p.preprocess_into(ids, b), peer.preprocess(ids, BLOCK_M))
                    entry[f"{name}_us"] = median_us(lambda: stage_p.preprocess_into(ids, b))
                    entry[f"{name}_graph_us"] = graph_us(lambda: stage_p.preprocess_into(ids, b))
                    entry[f"{name}_kernels"] = list(b.plan.kernel_names)
                    timed.append(name)
            compare.append(entry)
            print("    path " + ", ".join(f"{p} {entry[p + '_us']:.2f} us (graph {entry[p + '_graph_us']:.2f})"
                                       for p in timed))
        del ids, buffers

    decode = [r for r in rows_out if r["num_slots"] <= DECODE_MAX]
    large = [r for r in rows_out if r["num_slots"] >= BANDWIDTH_MIN]
    goals = {
        "decode_within_1.2x_launch": all(r["ours_us"] <= 1.2 * launch for r in decode),
        "decode_worst_ratio_to_launch": max((r["ours_us"] / launch for r in decode), default=None),
        "decode_hot_worst_ratio_to_launch": max((r["ours_hot_us"] / launch_hot for r in decode), default=None),
        "decode_graph_worst_ratio_to_launch": max((r["ours_graph_us"] / launch_graph for r in decode
                                                   if r["ours_graph_us"] and launch_graph), default=None),
        "decode_wall_worst_ratio_to_launch": max((r["ours_wall_us"] / launch_wall for r in decode), default=None),
        "decode_copy_floor_worst_ratio_to_launch": max((r["copy_floor_us"] / launch for r in decode), default=None),
        "decode_worst_ratio_to_copy_floor": max((r["ours_us"] / r["copy_floor_us"] for r in decode), default=None),
        "large_at_least_70pct_copy": all(r["roofline_frac"] >= 0.7 for r in large),
        "large_worst_roofline_frac": min((r["roofline_frac"] for r in large), default=None),
        "large_worst_frac_of_same_bytes_copy": min((r["copy_same_bytes_frac"] for r in large), default=None),
        "large_worst_launch_then_copy_frac": min((r["launch_then_copy_frac"] for r in large), default=None),
        "faster_than_torch_everywhere": all(r["speedup"] > 1 for r in rows_out),
        "min_speedup": min(r["speedup"] for r in rows_out),
    }
    result = {"bench": "preprocess", "gpu": gpu, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "config": {"global_experts": E, "ep_size": args.ep, "rank": RANK, "local_experts": ctx.local.count,
                         "top_k": TOP_K, "block_m": BLOCK_M, "id_dtype": "int32",
                         "sentinel": "non_local" if args.ep > 1 else "out_of_range",
                         "padding_rows": "1/4 of each source slice", "map": "shared memory" if args.ep > 1 else "none",
                         "timer": "triton.testing.do_bench median (CUDA events, L2 flushed)",
                         "torch": torch.__version__},
              "copy_gbps": copy, "launch_us": launch, "launch_hot_us": launch_hot, "launch_graph_us": launch_graph, "launch_wall_us": launch_wall,
              "rows": rows_out, "path_compare": compare, "kernel_breakdown_us": breakdown, "goals": goals}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("goals:", json.dumps(goals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
