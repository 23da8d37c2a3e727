#!/usr/bin/env python3
"""Time every kernel variant of the ``marlin`` backend (base, lean) against the peer, in one process, on one GPU.

For each shape (default qwen3-30b-a3b, mixtral-8x7b) and M (default 1,4,16,64,256 tokens): one stage, 8
routing sets (weights come from DRAM, as in bench_marlin.py), then for each variant of
`moe_plugin_marlin.kernels.VARIANTS`:

1. correctness first: NaN-poison the stage's workspaces (inter, slot_out, out), run eagerly on set 0,
   compare with ``moe_reference`` (float32 on the GPU): finite and ||out - ref|| / ||ref|| < 1e-2, else the
   variant is reported FAIL for that case and not timed;
2. CUDA graphs of all 8 sets, median of the mean replay time (same timer as bench_marlin.py).

The peer (vLLM 0.26.0 Marlin MoE, ``--peer ''`` to skip) is timed once per case on the same inputs.
Prints one compact table (us and speedup vs the peer per variant) and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_marlin import (
    INPUT_SETS,
    PEER_NAME,
    Peer,
    build_ours,
    capture,
    copy_bandwidth_gbps,
    make_inputs,
    random_gptq,
    time_graphs,
    weight_bytes,
)

from hostcore import LocalRouting
from hostcore.backends.experts_torch import moe_reference
from hostcore.workload import SHAPES

RTOL = 1e-2


def check_variant(stage, weights, hidden: torch.Tensor, ids: torch.Tensor, topw: torch.Tensor,
                  zeros: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """(ok, rel err) of one eager call with NaN-poisoned workspaces against ``ref`` (float32)."""
    for buf in (stage.inter, stage.slot_out, stage.out):
        buf.fill_(float("nan"))
    out = stage.compute(hidden, topw, LocalRouting(ids, zeros)).float()
    torch.cuda.synchronize()
    finite = bool(out.isfinite().all())
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    return finite and err < RTOL, err


def bench(shapes: list[str], ms: list[int], variants: list[str], peer: Peer | None, copy_gbps: float,
          repeats: int, rounds: int) -> list[dict]:
    from moe_plugin_marlin.stage import describe_tiles

    rows = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        weights = random_gptq(shape.num_experts, shape.hidden_size, shape.intermediate_size, shape.group_size,
                              torch.bfloat16, 5)
        stage = build_ours(shape, weights, max(ms), torch.bfloat16)
        g = shape.group_size or shape.hidden_size
        h, i = shape.hidden_size, shape.intermediate_size
        scale_bytes = 2 * (2 * i * h // g + h * i // g)
        zeros = torch.zeros(shape.num_experts, dtype=torch.int32, device="cuda")
        for m in ms:
            sets = [make_inputs(shape, m, torch.bfloat16, 100 * m + s) for s in range(INPUT_SETS)]
            hid0, ids0, tw0 = sets[0]
            ref = moe_reference(hid0, tw0, ids0, weights, torch.float32).float()
            roof = weight_bytes(shape, [x for _, x, _ in sets], 0.5, scale_bytes) / (copy_gbps * 1e3)
            row: dict = {"case": f"{shape_name} M={m}", "shape": shape_name, "M": m, "roofline_us": round(roof, 2),
                         "peer": PEER_NAME, "peer_us": None, "variants": {}}
            if peer is not None:
                try:
                    runs = [peer.make(shape, stage.weights.w13, stage.weights.w13_scales, stage.weights.w2,
                                      stage.weights.w2_scales, hh, ii, ww) for hh, ii, ww in sets]
                    t0 = time.perf_counter()
                    graphs = [capture(r) for r in runs]
                    if not peer.warm:
                        row["peer_first_capture_s"] = round(time.perf_counter() - t0, 1)
                        peer.warm = True
                    row["peer_us"] = round(time_graphs(graphs, repeats, rounds), 2)
                    del graphs, runs
                except Exception as exc:  # noqa: BLE001  (keep our numbers)
                    row["peer_error"] = str(exc)[:300]
            for v in variants:
                rec: dict = {}
                try:
                    stage.set_variant(v)
                    rec.update(describe_tiles(stage, m, shape.top_k))
                    ok, err = check_variant(stage, weights, hid0, ids0, tw0, zeros, ref)
                    rec.update(ok=ok, rel_err=float(f"{err:.3g}"))
                    if ok:
                        graphs = [capture(lambda hh=hh, ii=ii, ww=ww, st=stage, z=zeros: st.compute(hh, ww, LocalRouting(ii, z)))
                                  for hh, ii, ww in sets]
                        us = time_graphs(graphs, repeats, rounds)
                        del graphs
                        # after timing: graph replays must still give the right answer (self-cleaning workspaces)
                        ok2, _ = check_variant(stage, weights, hid0, ids0, tw0, zeros, ref)
                        rec.update(us=round(us, 2), roofline_frac=round(roof / us, 3), ok_after=ok2)
                        if row["peer_us"]:
                            rec["speedup"] = round(row["peer_us"] / us, 3)
                except Exception as exc:  # noqa: BLE001  (a broken variant must not lose the others)
                    rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                row["variants"][v] = rec
            stage.set_variant("base")
            rows.append(row)
            print(json.dumps(row), flush=True)
        del stage
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], variants: list[str]) -> str:
    """Compact text table: peer us, then per variant ``us (speedup)`` or FAIL."""
    head = f"{'case':24s} {'roof':>6s} {'peer':>7s} " + " ".join(f"{v:>16s}" for v in variants)
    lines = [head]
    for r in rows:
        cells = []
        for v in variants:
            x = r["variants"].get(v, {})
            if not x.get("ok"):
                cells.append(f"{'FAIL ' + str(x.get('rel_err', x.get('error', '?')))[:11]:>16s}")
            else:
                sp = x.get("speedup")
                bad = "" if x.get("ok_after", True) else "!"
                cells.append(f"{x['us']:8.1f}{bad} ({sp:4.2f}x)" if sp else f"{x['us']:8.1f}{bad}        ")
        peer = f"{r['peer_us']:7.1f}" if r.get("peer_us") else f"{'-':>7s}"
        lines.append(f"{r['case']:24s} {r['roofline_us']:6.1f} {peer} " + " ".join(f"{c:>16s}" for c in cells))
    lines.append("(us per MoE forward, CUDA graphs; (x) = peer / variant; ! = wrong after graph replays)")
    return "\n".join(lines)


def main() -> None:
    from moe_plugin_marlin.kernels import VARIANTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--ms", default="1,4,16,64,256")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--peer", default=".peer/_moe_C_stable_libtorch.abi3.so", help="'' to skip the peer")
    ap.add_argument("--out", default="bench/results/marlin-variants-h100.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    variants = args.variants.split(",")
    print("device:", torch.cuda.get_device_name(0), flush=True)
    copy_gbps = copy_bandwidth_gbps()
    peer = Peer(args.peer) if args.peer and Path(args.peer).exists() else None
    if args.peer and peer is None:
        print(f"peer library {args.peer} not found: timing ours only", flush=True)
    t0 = time.perf_counter()
    rows = bench(args.shapes.split(","), [int(x) for x in args.ms.split(",")], variants, peer, copy_gbps,
                 args.repeats, args.rounds)
    result = {"bench": "marlin-variants", "device": torch.cuda.get_device_name(0), "copy_gbps": round(copy_gbps, 1),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "variants": variants,
              "wall_s": round(time.perf_counter() - t0, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(table(rows, variants))
    for r in rows:
        print(f"  plans {r['case']}: " + "; ".join(f"{v} {x.get('gemm1')}|{x.get('gemm2')}"
                                                     for v, x in r["variants"].items()))
    fails = [(r["case"], v) for r in rows for v, x in r["variants"].items() if not x.get("ok") or not x.get("ok_after", True)]
    print(f"variant failures: {fails if fails else 'none'}")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
