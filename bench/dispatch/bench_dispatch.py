#!/usr/bin/env python3
"""Dispatch + combine latency on one host: flashinfer_onesided vs raw MoeAlltoAll vs the host's torch_a2a.

Run on the GPU host with one process per GPU (EP = world size)::

    torchrun --standalone --nproc-per-node N bench/dispatch/bench_dispatch.py --out bench/results

Contenders, all in the same processes, on the same tokens and routing:

``flashinfer_onesided``
    the plugin's stage exactly as the pipeline calls it: ``dispatch(PreparedTokens,
    rows_per_rank=R)`` then ``combine(expert_out)`` (expert output in its own
    tensor, so FlashInfer stages it into the workspace), sentinel from the
    default strategy ``auto`` (the first non-local expert: ``api=moe_alltoall``).
``moe_alltoall_raw``
    ``flashinfer.comm.MoeAlltoAll.dispatch`` + ``combine`` called directly with
    the same payloads, sentinel, workspace and output allocation (a torch
    tensor, as the plugin passes): the floor the plugin adds to.
``torch_a2a``
    the host's padded all-to-all over NCCL (the peer; ``speedup = torch_a2a /
    flashinfer_onesided``).

Extras, reported but not in the goals: ``flashinfer_onesided_agree_r`` (the
plugin with ``rows_per_rank=None``: one all-reduce and a host sync more) and
``flashinfer_onesided_moe_ep`` (sentinel ``guard_slot``, which runs through
``flashinfer.moe_ep.NVLinkOneSidedAlltoAll``).

Timing: eager mode, CUDA events around dispatch and around combine; before each
timed step a 1-element NCCL all-reduce lines the ranks up. The contenders are
interleaved: every iteration runs each of them once, in an order rotated per
iteration, so host jitter hits all alike (eager steps on these sizes are bound
by host launch time). Median over ``--iters`` after ``--warmup``, then the max
over ranks. Graph mode: one captured dispatch+combine step of the plugin and
of raw MoeAlltoAll, replays interleaved and timed the same way (total only); ``torch_a2a`` is captured only
with ``--graph-peer`` (its dispatch was not written for capture: a failed
capture of NCCL work could disturb the rest of the run). Effective bandwidth: payload bytes a rank sends
(a token counted once per destination rank, itself included; dispatch: hidden +
int32 ids + fp32 weights, combine: hidden) over the time, averaged over ranks.
Also measured: NCCL all-reduce bus bandwidth of 1 GiB on the same GPUs.

Writes ``<out>/dispatch-<gpu>-ep<N>.json`` (``<gpu>``: h100, h200, ... from the
device name) and prints a table. ``--dry-run`` runs everything on CPU ranks
against the fake FlashInfer of the plugin's tests (gloo, host timers, no
graphs) to check this script, not to measure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

# Never NVLink multicast (NVLS) in this project: set before torch.distributed or FlashInfer start.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import torch
import torch.distributed as dist
from rows import MAIN, PEER, RAW, with_standard_rows  # this script's folder is on sys.path when it runs

REPO = Path(__file__).resolve().parents[2]
SHAPES = {  # name: (hidden, top_k, experts)
    "dsv3": (7168, 8, 256),
    "mixtral": (4096, 2, 8),
}
AGREE, MOE_EP = "flashinfer_onesided_agree_r", "flashinfer_onesided_moe_ep"


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[bench_dispatch] {msg}", flush=True)


# -- timers ---------------------------------------------------------------------------------------------


class Clock:
    """CUDA events on GPUs, host time on the CPU dry run; ``stamp()`` marks now on the current stream."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def stamp(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def us(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) * 1e3 if self.cuda else (b - a) * 1e6

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def line_up(device: torch.device) -> None:
    """A 1-element all-reduce: every rank's stream waits for the others before the timed step starts."""
    dist.all_reduce(torch.ones(1, device=device))


# -- contenders -----------------------------------------------------------------------------------------


@dataclass
class Step:
    """One contender for one token count: ``dispatch()`` then ``combine()`` (called in that order)."""

    dispatch: Callable[[], Any]
    combine: Callable[[], Any]


def routing(rank: int, tokens: int, shape: str, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    hidden, top_k, experts = SHAPES[shape]
    g = torch.Generator().manual_seed(seed * 7919 + rank * 104729 + tokens)
    ids = torch.rand((tokens, experts), generator=g).topk(top_k, dim=1).indices.to(torch.int32)
    return {"hidden": torch.randn((tokens, hidden), generator=g).to(torch.bfloat16).to(device),
            "topk_ids": ids.to(device),
            "topk_weights": torch.rand((tokens, top_k), generator=g).to(device)}


def payload_bytes(tok: dict[str, torch.Tensor], shape: str, ep: int) -> tuple[int, int]:
    """Bytes this rank sends in dispatch and gets sent back in combine (a token once per destination rank)."""
    hidden, top_k, experts = SHAPES[shape]
    per = experts // ep
    dests = sum(len({int(e) // per for e in row}) for row in tok["topk_ids"].cpu().tolist())
    return dests * (hidden * 2 + top_k * 8), dests * hidden * 2


def pick_sentinel(strategy: str, local: Any, ctx: Any) -> tuple[int, Any]:
    """The sentinel the pipeline would use: the sentinel plugin if installed, else computed from the map."""
    try:
        from hostcore import Stage
        from hostcore.registry import get_registry

        return get_registry().get(Stage.SENTINEL, strategy).factory(ctx).choose(local)
    except Exception:
        table = local.expert_map[: local.global_num_experts].tolist()
        if strategy == "auto" and -1 in table:
            return table.index(-1), local
        return local.global_num_experts, local.with_map(torch.cat([local.expert_map,
                                                                    local.expert_map.new_full((1,), -1)]))


class Contenders:
    """Everything built once per shape; `steps` makes the per-token-count closures."""

    def __init__(self, shape: str, ep: int, rank: int, device: torch.device, max_tokens: int, dry_run: bool,
                 extras: bool) -> None:
        from moe_plugin_flashinfer_onesided import build

        from hostcore import BackendChoice, BuildContext, ExpertPlacement, Stage
        from hostcore.backends.dispatch_torch import TorchAllToAllDispatch
        from hostcore.registry import get_registry

        hidden, top_k, experts = SHAPES[shape]
        self.shape, self.ep, self.rank, self.device = shape, ep, rank, device
        placement = ExpertPlacement.contiguous(experts, ep)
        local = placement.local_experts(rank, True, device)
        ctx = BuildContext(rank=rank, ep_size=ep, device=device, placement=placement, local=local,
                           hidden_size=hidden, top_k=top_k, dtype=torch.bfloat16, max_tokens_per_rank=max_tokens)
        sentinel, local = pick_sentinel("auto", local, ctx)
        self.ctx = replace(ctx, local=local, sentinel=sentinel)

        def plugin(c: Any) -> Any:
            if dry_run:  # the CPU fake is not "available" (no GPUs): call the factory itself
                return build(c)
            return get_registry().build(Stage.DISPATCH, BackendChoice.of("flashinfer_onesided"), c)

        self.plugin = plugin(self.ctx)
        self.torch_a2a = TorchAllToAllDispatch(self.ctx)
        self.raw = self._raw(hidden, top_k, experts, max_tokens, sentinel)
        self.moe_ep = None
        if extras:
            gs, gl = pick_sentinel("guard_slot", placement.local_experts(rank, True, device), ctx)
            self.moe_ep = plugin(replace(ctx, local=gl, sentinel=gs))
        self.sentinel = sentinel

    def _raw(self, hidden: int, top_k: int, experts: int, max_tokens: int, sentinel: int) -> Any:
        """``MoeAlltoAll`` as a user would build it: same workspace size (so FlashInfer shares the workspace)."""
        import warnings

        from flashinfer.comm import (
            Mapping,
            MoeAlltoAll,
            moe_a2a_get_workspace_size_per_rank,
        )
        from flashinfer.comm.mnnvl import MnnvlConfig, TorchDistBackend

        size = moe_a2a_get_workspace_size_per_rank(self.ep, max_tokens, hidden * 2 + top_k * 8, hidden * 2)
        mapping = Mapping(world_size=self.ep, rank=self.rank, gpus_per_node=self.ep, tp_size=self.ep,
                          moe_ep_size=self.ep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return MoeAlltoAll(mapping, max_num_tokens=max_tokens, top_k=top_k, num_experts=experts,
                               workspace_size_per_rank=size,
                               mnnvl_config=MnnvlConfig(comm_backend=TorchDistBackend(group=None)))

    def steps(self, tokens: int) -> tuple[dict[str, Step], dict[str, torch.Tensor]]:
        from hostcore import PreparedTokens

        tok = routing(self.rank, tokens, self.shape, self.device)
        prepared = PreparedTokens(tok["hidden"], tok["topk_ids"], tok["topk_weights"])
        hidden = SHAPES[self.shape][0]
        r = tokens
        expert_out = torch.randn((self.ep, r, hidden), generator=torch.Generator().manual_seed(3)).to(
            torch.bfloat16).to(self.device)
        raw, sentinel = self.raw, self.sentinel
        steps = {
            MAIN: Step(lambda: self.plugin.dispatch(prepared, r), lambda: self.plugin.combine(expert_out)),
            RAW: Step(lambda: raw.dispatch(tok["topk_ids"], [tok["topk_ids"], tok["topk_weights"], tok["hidden"]], r,
                                           invalid_token_expert_id=sentinel, expert_id_payload_index=0),
                      lambda: raw.combine(expert_out, r, output=torch.empty((tokens, hidden), dtype=torch.bfloat16,
                                                                            device=self.device))),
            PEER: Step(lambda: self.torch_a2a.dispatch(prepared, r), lambda: self.torch_a2a.combine(expert_out)),
        }
        if self.moe_ep is not None:
            steps[AGREE] = Step(lambda: self.plugin.dispatch(prepared, None), lambda: self.plugin.combine(expert_out))
            steps[MOE_EP] = Step(lambda: self.moe_ep.dispatch(prepared, r), lambda: self.moe_ep.combine(expert_out))
        return steps, tok


def time_eager(steps: dict[str, Step], clock: Clock, device: torch.device, warmup: int,
               iters: int) -> dict[str, dict[str, Any]]:
    """Eager timing of every contender, interleaved: each iteration runs each contender once, in an order
    rotated by one per iteration, so host jitter and clock drift hit all contenders alike.

    Returns per contender ``{dispatch_us, combine_us, total_us, host_us}`` (medians; ``host_us``: host time
    of the dispatch and combine calls; close to ``total_us`` means the eager step waits on the host) or ``{"error": ...}``; a contender
    that raises is dropped from the remaining iterations (every rank makes the same calls, so all drop it).
    """
    names = list(steps)
    marks: dict[str, list[tuple[Any, Any, Any]]] = {n: [] for n in names}
    host: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for i in range(warmup + iters):
        live = [n for n in names if n not in errors]
        shift = i % len(live) if live else 0
        for name in live[shift:] + live[:shift]:
            try:
                line_up(device)
                a = clock.stamp()
                t0 = time.perf_counter()
                steps[name].dispatch()
                b = clock.stamp()
                steps[name].combine()
                t1 = time.perf_counter()
                c = clock.stamp()
            except Exception as exc:  # noqa: BLE001 - recorded in the report, the other contenders go on
                errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            if i >= warmup:
                marks[name].append((a, b, c))
                host[name].append((t1 - t0) * 1e6)
    clock.sync()
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in errors:
            out[name] = {"error": errors[name]}
            continue
        out[name] = {"dispatch_us": statistics.median(clock.us(a, b) for a, b, _ in marks[name]),
                     "combine_us": statistics.median(clock.us(b, c) for _, b, c in marks[name]),
                     "total_us": statistics.median(clock.us(a, c) for a, _, c in marks[name]),
                     "host_us": statistics.median(host[name])}
    return out


def host_profile(label: str, step: Step, device: torch.device, iters: int) -> None:
    """cProfile ``iters`` eager steps on rank 0 (every rank runs them: they are collectives) and print the
    functions with the most own time, to show where a contender's host time goes."""
    import cProfile
    import io
    import pstats

    for _ in range(10):
        line_up(device)
        step.dispatch()
        step.combine()
    profiler = cProfile.Profile()
    for _ in range(iters):
        line_up(device)
        if dist.get_rank() == 0:
            profiler.enable()
        step.dispatch()
        step.combine()
        if dist.get_rank() == 0:
            profiler.disable()
    if dist.get_rank() == 0:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        per_step = sum(v[2] for v in pstats.Stats(profiler).stats.values()) / iters * 1e6
        print(f"[bench_dispatch] host profile {label}: {per_step:.1f} us own time per step over {iters} steps\n"
              f"{text.getvalue()}", flush=True)


def capture(step: Step) -> torch.cuda.CUDAGraph:
    """One dispatch+combine captured after an eager run (`hostcore.cuda_graphs.capture`)."""
    from hostcore import cuda_graphs

    def once() -> None:
        step.dispatch()
        step.combine()

    return cuda_graphs.capture(once)[0]


def time_graph(steps: dict[str, Step], device: torch.device, iters: int) -> dict[str, dict[str, Any]]:
    """Capture each contender once, then time the replays interleaved as in `time_eager` (total only)."""
    graphs: dict[str, torch.cuda.CUDAGraph] = {}
    out: dict[str, dict[str, Any]] = {}
    for name, step in steps.items():
        try:
            graphs[name] = capture(step)
        except Exception as exc:  # noqa: BLE001 - recorded in the report
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    clock, names = Clock(device), list(graphs)
    marks: dict[str, list[tuple[Any, Any]]] = {n: [] for n in names}
    for i in range(10 + iters):
        shift = i % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            line_up(device)
            a = clock.stamp()
            graphs[name].replay()
            b = clock.stamp()
            if i >= 10:
                marks[name].append((a, b))
    clock.sync()
    for name in names:
        out[name] = {"total_us": statistics.median(clock.us(a, b) for a, b in marks[name])}
    return out


def allreduce_busbw(device: torch.device, gib: float, dry_run: bool) -> dict[str, float]:
    n = dist.get_world_size()
    numel = int(gib * 2**30) // 2
    x = torch.ones(numel, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        dist.all_reduce(x)
    clock = Clock(device)
    clock.sync()
    reps = 3 if dry_run else 10
    a = clock.stamp()
    for _ in range(reps):
        dist.all_reduce(x)
    b = clock.stamp()
    clock.sync()
    seconds = clock.us(a, b) / 1e6 / reps
    seconds = max_over_ranks(seconds)
    size = numel * 2
    del x
    return {"bytes": size, "seconds": seconds, "algbw_gbps": size / seconds / 1e9,
            "busbw_gbps": size / seconds / 1e9 * 2 * (n - 1) / n}


def max_over_ranks(value: float) -> float:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return max(out)


def gather(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# -- main -----------------------------------------------------------------------------------------------


def gpu_slug(name: str) -> str:
    match = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", name.upper())
    return match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="directory for the JSON")
    ap.add_argument("--shapes", default="dsv3,mixtral")
    ap.add_argument("--tokens", default="1,8,64,256,1024")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--graph-iters", type=int, default=200)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--graph-peer", action="store_true", help="also capture torch_a2a in a CUDA graph")
    ap.add_argument("--no-extras", action="store_true", help="skip the agree-R and moe_ep variants")
    ap.add_argument("--allreduce-gib", type=float, default=1.0)
    ap.add_argument("--dry-run", action="store_true", help="CPU ranks + the fake FlashInfer: check the script")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also cProfile N eager steps of the plugin and of raw MoeAlltoAll on rank 0 (first size of "
                         "each shape) and print where their host time goes")
    args = ap.parse_args()
    tokens_list = [int(t) for t in args.tokens.split(",")]
    shapes = [s for s in args.shapes.split(",") if s]

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.dry_run:
        sys.path[:0] = [str(REPO / "moe_plugins/flashinfer_onesided/tests"), str(REPO / "moe_plugins/flashinfer_onesided")]
        import fi_testlib

        fi_testlib.use_fake_flashinfer()
        from moe_plugin_flashinfer_onesided import dispatch as plugin_dispatch

        plugin_dispatch._require_cuda = lambda device: torch.device(device)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=datetime.timedelta(seconds=300))
        device = torch.device("cuda", local)
    rank, ep = dist.get_rank(), dist.get_world_size()
    clock = Clock(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-dry-run"
    try:
        import flashinfer

        fi_version = getattr(flashinfer, "__version__", "?")
    except Exception as exc:
        fi_version = f"import failed: {exc}"
    report: dict[str, Any] = {
        "schema": 1, "ep": ep, "gpu": gpu, "dry_run": args.dry_run, "peer": PEER,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "flashinfer": fi_version,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "iters": args.iters, "warmup": args.warmup, "graph_iters": 0 if args.no_graphs else args.graph_iters,
        "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                               "NVSHMEM_DISABLE_NVLS")},
        "results": [], "errors": [],
    }
    log(f"EP {ep} on {gpu}, flashinfer {fi_version}, torch {torch.__version__}")
    report["nccl_allreduce"] = allreduce_busbw(device, 1 / 1024 if args.dry_run else args.allreduce_gib, args.dry_run)
    log(f"NCCL all-reduce {report['nccl_allreduce']['bytes'] / 2**30:.3g} GiB: "
        f"bus bandwidth {report['nccl_allreduce']['busbw_gbps']:.0f} GB/s")

    max_tokens = max(tokens_list)
    for shape in shapes:
        try:
            cont = Contenders(shape, ep, rank, device, max_tokens, args.dry_run, not args.no_extras)
        except Exception as exc:
            report["errors"].append(f"{shape}: build failed on rank {rank}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            continue
        report.setdefault("plugin", {})[shape] = {"api": cont.plugin.api, "reason": cont.plugin.api_reason,
                                                  "sentinel_rank0": gather(cont.sentinel)[0],
                                                  "workspace_mib": cont.plugin.workspace_bytes / 2**20}
        for tokens in tokens_list:
            steps, tok = cont.steps(tokens)
            if args.profile and tokens == tokens_list[0]:
                for name in (MAIN, RAW):
                    host_profile(f"{shape} T={tokens} {name}", steps[name], device, args.profile)
            d_bytes, c_bytes = payload_bytes(tok, shape, ep)
            row: dict[str, Any] = {"shape": shape, "hidden": SHAPES[shape][0], "top_k": SHAPES[shape][1],
                                   "experts": SHAPES[shape][2], "tokens_per_rank": tokens, "rows_per_rank": tokens,
                                   "bytes_per_rank": {"dispatch": statistics.mean(gather(d_bytes)),
                                                      "combine": statistics.mean(gather(c_bytes))},
                                   "eager": {}, "graph": {}}
            mine = time_eager(steps, clock, device, args.warmup, args.iters)
            every = gather(mine)
            for name in steps:
                errs = [m[name]["error"] for m in every if "error" in m[name]]
                if errs:
                    row["eager"][name] = {"error": errs[0]}
                    continue
                res = {k: max(m[name][k] for m in every) for k in ("dispatch_us", "combine_us", "total_us", "host_us")}
                res["total_us_per_rank"] = [m[name]["total_us"] for m in every]
                res["gbps"] = {"dispatch": row["bytes_per_rank"]["dispatch"] / res["dispatch_us"] / 1e3,
                               "combine": row["bytes_per_rank"]["combine"] / res["combine_us"] / 1e3}
                row["eager"][name] = res
            if device.type == "cuda" and not args.no_graphs:
                graphed = {n: steps[n] for n in ((MAIN, RAW, PEER) if args.graph_peer else (MAIN, RAW))}
                every = gather(time_graph(graphed, device, args.graph_iters))
                for name in graphed:
                    errs = [m[name]["error"] for m in every if "error" in m[name]]
                    row["graph"][name] = {"error": errs[0]} if errs else \
                        {"total_us": max(m[name]["total_us"] for m in every)}
            ratio(row, "eager")
            ratio(row, "graph")
            report["results"].append(row)
            e = row["eager"]
            log(f"{shape:8s} T={tokens:5d}  " + "  ".join(
                f"{n}={e[n]['total_us']:.1f}us" if "total_us" in e.get(n, {}) else f"{n}=ERR"
                for n in (MAIN, RAW, PEER)))
        del cont
    report["goals"] = goals(report["results"])
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = "cpu-dry-run" if args.dry_run else gpu_slug(gpu)
        path = out / f"dispatch-{slug}-ep{ep}.json"
        path.write_text(json.dumps(with_standard_rows(report), indent=1))
        print(table(report), flush=True)
        print(f"[bench_dispatch] wrote {path}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if report["errors"] else 0


def ratio(row: dict[str, Any], mode: str) -> None:
    t = {n: v.get("total_us") for n, v in row[mode].items()}
    if t.get(MAIN) and t.get(PEER):
        row[f"speedup_{mode}"] = t[PEER] / t[MAIN]
    if t.get(MAIN) and t.get(RAW):
        row[f"plugin_over_raw_{mode}"] = t[MAIN] / t[RAW]
    if t.get(RAW) and t.get(PEER):
        row[f"raw_speedup_{mode}"] = t[PEER] / t[RAW]
    if mode == "eager":
        row["speedup"] = row.get("speedup_eager")


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals per mode: plugin <= 1.1x raw at every size; >= 1.6x faster than torch_a2a at <= 64 tokens
    per rank; never slower than torch_a2a at 1024. Each: ``{"checked": n, "missed": [...]}`` (n = 0: not measured)."""
    def check(key: str, applies: Callable[[int], bool], ok: Callable[[float], bool]) -> dict[str, Any]:
        vals = [(r["shape"], r["tokens_per_rank"], r[key]) for r in rows
                if r.get(key) and applies(r["tokens_per_rank"])]
        return {"checked": len(vals), "missed": [f"{s} T={t}: {v:.2f}x" for s, t, v in vals if not ok(v)]}

    out: dict[str, Any] = {}
    for mode in ("eager", "graph"):
        out[mode] = {
            "within_1.1x_of_raw": check(f"plugin_over_raw_{mode}", lambda t: True, lambda v: v <= 1.1),
            "1.6x_faster_than_torch_a2a_at_le_64": check(f"speedup_{mode}", lambda t: t <= 64, lambda v: v >= 1.6),
            "not_slower_than_torch_a2a_at_1024": check(f"speedup_{mode}", lambda t: t >= 1024, lambda v: v >= 1.0),
        }
    return out


def table(report: dict[str, Any]) -> str:
    head = (f"dispatch+combine, EP {report['ep']} on {report['gpu']} (max over ranks of the median, us); "
            f"NCCL all-reduce busbw {report['nccl_allreduce']['busbw_gbps']:.0f} GB/s")
    cols = ["shape", "T", "plugin d/c/total", "raw total", "torch_a2a total", "speedup", "plugin/raw",
            "host plugin/raw/a2a", "graph plugin/raw/a2a", "GB/s d/c"]
    lines = [head, " | ".join(cols)]
    for r in report["results"]:
        e, g = r["eager"], r["graph"]

        def tot(d: dict[str, Any], n: str, key: str = "total_us") -> str:
            return f"{d[n][key]:.1f}" if key in d.get(n, {}) else ("ERR" if n in d else "-")

        p = e.get(MAIN, {})
        plugin = f"{p['dispatch_us']:.1f}/{p['combine_us']:.1f}/{p['total_us']:.1f}" if "total_us" in p else "ERR"
        gb = f"{p['gbps']['dispatch']:.0f}/{p['gbps']['combine']:.0f}" if "gbps" in p else "-"
        sp = f"{r['speedup_eager']:.2f}x" if r.get("speedup_eager") else "-"
        po = f"{r['plugin_over_raw_eager']:.2f}x" if r.get("plugin_over_raw_eager") else "-"
        lines.append(" | ".join([r["shape"], str(r["tokens_per_rank"]), plugin, tot(e, RAW), tot(e, PEER), sp, po,
                                 "/".join(tot(e, n, "host_us") for n in (MAIN, RAW, PEER)),
                                 f"{tot(g, MAIN)}/{tot(g, RAW)}/{tot(g, PEER)}", gb]))
    for mode, checks in report.get("goals", {}).items():
        for goal, v in checks.items():
            verdict = ("not measured" if not v["checked"] else
                       f"met ({v['checked']} sizes)" if not v["missed"] else "MISSED at " + ", ".join(v["missed"]))
            lines.append(f"goal [{mode}] {goal}: {verdict}")
    for err in report.get("errors", []):
        lines.append(f"ERROR {err}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
