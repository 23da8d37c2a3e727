#!/usr/bin/env python3
"""Benchmark the ``marlin`` experts backend against vLLM 0.26.0's Marlin MoE and a bf16 torch MoE, on one GPU.

Every contender runs from CUDA graphs in the same process, on the same random
routing (distinct top-k experts per token, softmax weights) and bf16 activations:

* ours: `MarlinExperts.compute` (own align kernel + GEMM1/silu + GEMM2/router weight + top-k sum);
* peer: ``torch.ops._moe_C`` from vLLM 0.26.0 (benchmark only, never a dependency):
  ``moe_align_block_size`` + ``moe_wna16_marlin_gemm`` (w13) + silu_and_mul in torch +
  ``moe_wna16_marlin_gemm`` (w2, router weights) + ``moe_sum``; its block size is
  picked as vLLM's ``fused_marlin_moe`` does. Its weights are our packed tensors,
  which have the Marlin shapes ``[E, K/16, 2N]``; every bit pattern is a valid
  uint4b8 weight, so it streams the same bytes and does the same work (its output
  values are not compared);
* torch bf16: dequantized bf16 weights, tokens sorted by expert, ``torch._grouped_mm``.

Weights are read from DRAM, not L2: each case captures one graph per input set
(8 sets of routing) and replays them round-robin. Times are medians over
repeats of the mean replay time. The roofline is the bytes of the distinct
experts' weights a call must read (int4 + scales, or bf16) over the measured
device-to-device copy bandwidth (bytes read + written).

Ours is checked on every case before it is timed (one eager call with
NaN-poisoned workspaces against a float32 ``moe_reference``) and again after its
graphs were replayed (the workspaces must clean themselves up between calls);
a wrong case is reported (``ok`` / ``ok_after`` / ``rel_err`` per row), not
timed, and makes the exit status 1.

Also measures the first call in a fresh process (kernel compile, empty CuPy
cache) and with a warm cache (``--first-call-probe`` in a subprocess).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hostcore import BuildContext, ExpertPlacement, LocalRouting, cuda_graphs
from hostcore.backends.experts_torch import moe_reference
from hostcore.quant import QuantizedExperts, dequantize
from hostcore.workload import SHAPES

PEER_NAME = "vllm-0.26.0 marlin moe"
INPUT_SETS = 8
RTOL = 1e-2
"""Relative error (Frobenius) against the float32 reference above which a case counts as wrong."""


# ---------------------------------------------------------------------------------------------- helpers
def random_gptq(e: int, h: int, i: int, group: int | None, dtype: torch.dtype, seed: int) -> QuantizedExperts:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def one(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.randint(-2**31, 2**31, (e, k // 8, n), dtype=torch.int64, device="cuda", generator=gen).to(torch.int32)
        g = k if group is None else group
        s = (0.5 + torch.rand((e, k // g, n), device="cuda", generator=gen)) / (4.6 * k**0.5)
        return q, s.to(dtype)

    a, b = one(h, 2 * i)
    c, d = one(i, h)
    return QuantizedExperts(a, b, c, d, group)


def build_ours(shape, weights: QuantizedExperts, max_rows: int, dtype: torch.dtype):
    from moe_plugin_marlin.stage import MarlinExperts

    placement = ExpertPlacement.contiguous(shape.num_experts, 1)
    local = placement.local_experts(0, use_map=False, device="cuda")
    ctx = BuildContext(rank=0, ep_size=1, device=torch.device("cuda"), placement=placement, local=local,
                       hidden_size=shape.hidden_size, top_k=shape.top_k, dtype=dtype,
                       max_tokens_per_rank=max_rows, weights=weights)
    return MarlinExperts(ctx)


def copy_bandwidth_gbps() -> float:
    n = 1 << 30  # 1 GiB each way
    x = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    times = []
    for _ in range(3):
        y.copy_(x)
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del x, y
    return 2 * n / statistics.median(times) / 1e9


def capture(fn) -> torch.cuda.CUDAGraph:
    return cuda_graphs.capture(fn, warmups=2)[0]


def time_graphs(graphs: list[torch.cuda.CUDAGraph], repeats: int = 7, rounds: int = 10) -> float:
    """Median over ``repeats`` of the mean time per replay (us), replaying the graphs round-robin."""
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(rounds):
            for g in graphs:
                g.replay()
        e.record()
        e.synchronize()
        samples.append(s.elapsed_time(e) * 1e3 / (rounds * len(graphs)))
    return statistics.median(samples)


def make_inputs(shape, m: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn((m, shape.hidden_size), device="cuda", generator=gen).to(dtype)
    logits = torch.randn((m, shape.num_experts), device="cuda", generator=gen)
    top = torch.topk(logits, shape.top_k, dim=1)
    return hidden, top.indices.to(torch.int32).contiguous(), torch.softmax(top.values, dim=1).contiguous()


def weight_bytes(shape, ids_sets: list[torch.Tensor], bytes_per_weight: float, scale_bytes: float) -> float:
    """Mean over input sets of the bytes of the distinct experts' weights (+ scales) one call reads."""
    h, i = shape.hidden_size, shape.intermediate_size
    per_expert = 3 * h * i * bytes_per_weight + scale_bytes
    return statistics.mean(len(torch.unique(ids)) * per_expert for ids in ids_sets)


# ---------------------------------------------------------------------------------------------- peer
class Peer:
    """vLLM 0.26.0 Marlin MoE through its op library (schema printed at load)."""

    def __init__(self, lib: str) -> None:
        torch.ops.load_library(lib)
        self.ops = torch.ops._moe_C
        print("peer schema:", self.ops.moe_wna16_marlin_gemm.default._schema, flush=True)
        # vLLM ScalarType.uint(4, 8).id: exponent 8b | mantissa 8b | signed 1b | bias 32b | finite 1b | nan_repr 8b
        self.uint4b8_id = 0 | (4 << 8) | (0 << 16) | (8 << 17) | (0 << 49) | (1 << 50)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        self.workspace = torch.zeros(sms * 4, dtype=torch.int32, device="cuda")
        self.warm = False

    @staticmethod
    def block_size(m: int, top_k: int, e: int) -> int:
        for bs in (8, 16, 32, 48, 64):  # as vllm fused_marlin_moe picks it
            if m * top_k / e / bs < 0.9:
                return bs
        return 64

    def make(self, shape, w13, s13, w2, s2, hidden, ids, topw):
        m, top_k, e = hidden.shape[0], shape.top_k, shape.num_experts
        h, i = shape.hidden_size, shape.intermediate_size
        bs = self.block_size(m, top_k, e)
        cap = ids.numel() + e * (bs - 1)
        sorted_ids = torch.empty(cap, dtype=torch.int32, device="cuda")
        expert_ids = torch.zeros(-(-cap // bs), dtype=torch.int32, device="cuda")
        npp = torch.empty(1, dtype=torch.int32, device="cuda")
        c1 = torch.empty((m * top_k, 2 * i), dtype=hidden.dtype, device="cuda")
        c2 = torch.empty((m * top_k, h), dtype=hidden.dtype, device="cuda")
        out = torch.empty((m, h), dtype=hidden.dtype, device="cuda")
        ops = self.ops

        def run() -> torch.Tensor:
            sorted_ids.fill_(ids.numel())
            ops.moe_align_block_size(ids, e, bs, sorted_ids, expert_ids, npp, None)
            ops.moe_wna16_marlin_gemm(hidden, c1, w13, None, s13, None, None, None, None, None, self.workspace,
                                      sorted_ids, expert_ids, npp, topw, bs, top_k, False, self.uint4b8_id,
                                      m, 2 * i, h, True, False, True, False, -1, -1, -1)
            act = torch.nn.functional.silu(c1[:, :i]) * c1[:, i:]
            ops.moe_wna16_marlin_gemm(act, c2, w2, None, s2, None, None, None, None, None, self.workspace,
                                      sorted_ids, expert_ids, npp, topw, bs, 1, True, self.uint4b8_id,
                                      m * top_k, h, i, True, False, True, False, -1, -1, -1)
            ops.moe_sum(c2.view(m, top_k, h), out)
            return out

        return run


# ---------------------------------------------------------------------------------------------- torch bf16
class TorchBF16:
    """bf16 MoE: tokens sorted by expert, two ``torch._grouped_mm`` (capturable: no host sync)."""

    def __init__(self, weights: QuantizedExperts, dtype: torch.dtype) -> None:
        e = weights.num_experts
        self.w13 = torch.stack([dequantize(weights.w13_qweight[x], weights.w13_scales[x], weights.group_size).to(dtype)
                                for x in range(e)])
        self.w2 = torch.stack([dequantize(weights.w2_qweight[x], weights.w2_scales[x], weights.group_size).to(dtype)
                               for x in range(e)])
        self.e = e
        self.inter = weights.intermediate_size

    def make(self, hidden, ids, topw):
        m, top_k = ids.shape
        e, i = self.e, self.inter

        def run() -> torch.Tensor:
            flat = ids.reshape(-1).long()
            order = torch.argsort(flat, stable=True)
            counts = torch.zeros(e, dtype=torch.int32, device="cuda").scatter_add_(
                0, flat, torch.ones_like(flat, dtype=torch.int32))
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            rows = order // top_k
            x = hidden[rows]
            h1 = torch._grouped_mm(x, self.w13, offs=offs)
            a = torch.nn.functional.silu(h1[:, :i]) * h1[:, i:]
            h2 = torch._grouped_mm(a, self.w2, offs=offs)
            h2 = h2 * topw.reshape(-1)[order].unsqueeze(1).to(h2.dtype)
            return torch.zeros_like(hidden).index_add_(0, rows, h2)

        return run


# ---------------------------------------------------------------------------------------------- first call
def rel_err_ours(stage, hidden: torch.Tensor, ids: torch.Tensor, topw: torch.Tensor, zeros: torch.Tensor,
                 ref: torch.Tensor) -> float:
    """Relative error of one eager `compute` (workspaces NaN-poisoned first, so a value read before it is
    written shows up) against ``ref``; ``inf`` when the output is not finite."""
    for buf in (stage.inter, stage.slot_out, stage.out):
        buf.fill_(float("nan"))
    out = stage.compute(hidden, topw, LocalRouting(ids, zeros)).float()
    if not bool(out.isfinite().all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def first_call_probe(shape_name: str) -> None:
    """In a fresh process: time the stage build (weight packing + kernel compile) and the first compute."""
    t_import = time.perf_counter()
    import moe_plugin_marlin.stage  # noqa: F401  (CuPy import counted)
    shape = SHAPES[shape_name]
    weights = random_gptq(shape.num_experts, shape.hidden_size, shape.intermediate_size, shape.group_size,
                          torch.bfloat16, 1)
    hidden, ids, topw = make_inputs(shape, 4, torch.bfloat16, 2)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    from moe_plugin_marlin import jit
    ks_t0 = time.perf_counter()
    jit.kernel_set(torch.cuda.current_device(), True, shape.group_size)
    compile_s = time.perf_counter() - ks_t0
    stage = build_ours(shape, weights, 4, torch.bfloat16)
    out = stage.compute(hidden, topw, LocalRouting(ids, torch.zeros(shape.num_experts, dtype=torch.int32,
                                                                         device="cuda")))
    out.sum().item()
    total = time.perf_counter() - t0
    print(json.dumps({"compile_s": compile_s, "first_call_s": total, "import_s": t0 - t_import}))


def probe(shape_name: str, cache_dir: str) -> dict:
    env = dict(os.environ, CUPY_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--first-call-probe", shape_name], env=env, capture_output=True,
                       text=True, timeout=300)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"first-call probe failed:\n{r.stdout}\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


# ---------------------------------------------------------------------------------------------- main
def bench_shape(shape_name: str, ms: list[int], peer: Peer | None, copy_gbps: float, tile_sweep: bool,
                dtype: torch.dtype) -> list[dict]:
    from moe_plugin_marlin.stage import describe_tiles

    shape = SHAPES[shape_name]
    weights = random_gptq(shape.num_experts, shape.hidden_size, shape.intermediate_size, shape.group_size, dtype, 5)
    stage = build_ours(shape, weights, max(ms), dtype)
    ref = None
    try:
        ref = TorchBF16(weights, dtype)
    except Exception as exc:  # noqa: BLE001  (report, keep benchmarking the others)
        print(f"torch bf16 reference unavailable: {exc}", flush=True)
    g = shape.group_size or shape.hidden_size
    scale_bytes = 2 * (2 * shape.intermediate_size * shape.hidden_size // g + shape.hidden_size * shape.intermediate_size // g)
    rows = []
    for m in ms:
        sets = [make_inputs(shape, m, dtype, 100 * m + s) for s in range(INPUT_SETS)]
        zeros = torch.zeros(shape.num_experts, dtype=torch.int32, device="cuda")
        hid0, ids0, tw0 = sets[0]
        ref0 = moe_reference(hid0, tw0, ids0, weights, torch.float32).float()
        err = rel_err_ours(stage, hid0, ids0, tw0, zeros, ref0)
        ok = err < RTOL
        ours_us = float("nan")
        sweep = {}
        if ok:  # a wrong kernel's time means nothing
            ours_graphs = [capture(lambda h=h, i=i, w=w: stage.compute(h, w, LocalRouting(i, zeros)))
                           for h, i, w in sets]
            ours_us = time_graphs(ours_graphs)
            if tile_sweep:
                sweep = sweep_tiles(stage, shape, sets, zeros, m)
            del ours_graphs
        ok_after = ok and rel_err_ours(stage, hid0, ids0, tw0, zeros, ref0) < RTOL
        del ref0
        tiles = describe_tiles(stage, m, shape.top_k)
        int4_bytes = weight_bytes(shape, [i for _, i, _ in sets], 0.5, scale_bytes)
        bf16_bytes = weight_bytes(shape, [i for _, i, _ in sets], 2.0, 0)
        roof_us = int4_bytes / (copy_gbps * 1e3)
        row = {"case": f"{shape_name} M={m}", "shape": shape_name, "M": m, "ok": ok, "ok_after": ok_after,
               "rel_err": float(f"{err:.3g}"), "ours_us": round(ours_us, 2) if ok else None,
               "peer": PEER_NAME, "peer_us": None, "speedup": None, "roofline_us": round(roof_us, 2),
               "roofline_frac": round(roof_us / ours_us, 3) if ok else None, "weight_mb": round(int4_bytes / 1e6, 1),
               "tiles": tiles}
        if peer is not None:
            try:
                runs = [peer.make(shape, stage.weights.w13, stage.weights.w13_scales, stage.weights.w2,
                                  stage.weights.w2_scales, h, i, w) for h, i, w in sets]
                t0 = time.perf_counter()
                peer_graphs = [capture(r) for r in runs]
                if not peer.warm:
                    row["peer_first_capture_s"] = round(time.perf_counter() - t0, 1)  # includes its PTX JIT
                    peer.warm = True
                row["peer_us"] = round(time_graphs(peer_graphs), 2)
                row["speedup"] = round(row["peer_us"] / ours_us, 3) if ok else None
                row["peer_roofline_frac"] = round(roof_us / row["peer_us"], 3)
                del peer_graphs, runs
            except Exception as exc:  # noqa: BLE001  (a broken peer call must not lose our numbers)
                print(f"peer failed at {shape_name} M={m}: {exc}", flush=True)
                row["peer_error"] = str(exc)[:300]
        if ref is not None:
            try:
                tg = [capture(ref.make(h, i, w)) for h, i, w in sets]
                row["torch_bf16_us"] = round(time_graphs(tg), 2)
                row["torch_bf16_roofline_frac"] = round(bf16_bytes / (copy_gbps * 1e3) / row["torch_bf16_us"], 3)
                del tg
            except Exception as exc:  # noqa: BLE001
                print(f"torch bf16 reference failed at M={m}: {exc}", flush=True)
                ref = None
        if sweep:
            row["tile_sweep"] = sweep
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.synchronize()
    del stage, ref
    torch.cuda.empty_cache()
    return rows


def sweep_tiles(stage, shape, sets, zeros, m: int) -> dict:
    """Time every fitting (n_warps, k_splits) per GEMM with the other GEMM at its default plan."""
    from moe_plugin_marlin import kernels

    h, i = shape.hidden_size, shape.intermediate_size
    slots = m * shape.top_k
    bm = kernels.choose_block_m(slots, stage.num_local)
    res = {}
    for which, n_out, k, splits in (("gemm1", 2 * i, h, (1,)), ("gemm2", h, i, (1, 2, 3, 4, 5, 6, 8))):
        for nw in (4, 2, 1):
            for sp in splits:
                try:
                    kernels.plan_gemm(n_out, k, slots, stage.num_local, bm, stage.sm_count, which == "gemm2", (nw, sp))
                except ValueError:
                    continue
                if sp > 1 and k // (16 * (8 // nw) * 2) < sp:
                    continue
                stage.tile_override = {which: (nw, sp)}
                graphs = [capture(lambda h_=h_, i_=i_, w_=w_: stage.compute(h_, w_, LocalRouting(i_, zeros)))
                          for h_, i_, w_ in sets]
                res[f"{which}:tn{64 * nw}:split{sp}"] = round(time_graphs(graphs, repeats=5, rounds=5), 2)
                del graphs
    stage.tile_override = {}
    return res


def plot(rows: list[dict], path: str, copy_gbps: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        rs = [r for r in rows if r["shape"] == s]
        ms = [r["M"] for r in rs]
        ax.plot(ms, [r["ours_us"] or float("nan") for r in rs], "o-", label="ours (marlin plugin)")
        if any(r.get("peer_us") for r in rs):
            ax.plot(ms, [r.get("peer_us") or float("nan") for r in rs], "s-", label="vLLM 0.26.0 Marlin MoE")
        if any(r.get("torch_bf16_us") for r in rs):
            ax.plot(ms, [r.get("torch_bf16_us") or float("nan") for r in rs], "^-", label="torch bf16 grouped_mm")
        ax.plot(ms, [r["roofline_us"] for r in rs], "k--", label=f"int4 weight roofline @ {copy_gbps:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("us per MoE layer (CUDA graph)")
        ax.set_title(s)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--ms", default="1,4,16,64,256")
    ap.add_argument("--peer", default=".peer/_moe_C_stable_libtorch.abi3.so", help="'' to skip the peer")
    ap.add_argument("--out", default="bench/results/marlin-h100.json")
    ap.add_argument("--png", default="")
    ap.add_argument("--tile-sweep", action="store_true")
    ap.add_argument("--no-first-call", action="store_true")
    ap.add_argument("--first-call-probe", default="")
    ap.add_argument("--gpu-name", default="h100")
    args = ap.parse_args()
    if args.first_call_probe:
        first_call_probe(args.first_call_probe)
        return
    print("device:", torch.cuda.get_device_name(0), flush=True)
    result: dict = {"bench": "marlin", "gpu": args.gpu_name, "device": torch.cuda.get_device_name(0),
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "rows": []}
    if not args.no_first_call:
        with tempfile.TemporaryDirectory() as cache:
            result["first_call_fresh"] = probe("qwen3-30b-a3b", cache)
            result["first_call_warm"] = probe("qwen3-30b-a3b", cache)
        print("first call:", result["first_call_fresh"], result["first_call_warm"], flush=True)
    copy_gbps = copy_bandwidth_gbps()
    result["copy_gbps"] = round(copy_gbps, 1)
    print(f"copy bandwidth {copy_gbps:.0f} GB/s (read + write)", flush=True)
    peer = None
    if args.peer:
        t0 = time.perf_counter()
        peer = Peer(args.peer)
        result["peer_load_s"] = round(time.perf_counter() - t0, 2)
    ms = [int(x) for x in args.ms.split(",")]
    for s in args.shapes.split(","):
        result["rows"].extend(bench_shape(s, ms, peer, copy_gbps, args.tile_sweep, torch.bfloat16))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        plot(result["rows"], args.png, copy_gbps)
    print(f"\n{'case':28s} {'ours us':>9s} {'peer us':>9s} {'speedup':>8s} {'roof us':>8s} {'roof %':>7s} "
          f"{'bf16 us':>9s}  tiles")
    nan = float("nan")
    for r in result["rows"]:
        print(f"{r['case']:28s} {r['ours_us'] or nan:9.1f} {r['peer_us'] or nan:9.1f} "
              f"{r['speedup'] or nan:8.2f} {r['roofline_us']:8.1f} {100 * (r['roofline_frac'] or nan):6.0f}% "
              f"{r.get('torch_bf16_us') or nan:9.1f}  {r['tiles']}")
    wrong = [(r["case"], r["rel_err"]) for r in result["rows"] if not (r["ok"] and r["ok_after"])]
    print(f"ours against the float32 reference (rel err < {RTOL}): {'all ok' if not wrong else f'WRONG {wrong}'}")
    if wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
