#!/usr/bin/env python3
"""Plot ``bench_dispatch.py`` results: latency per contender vs tokens per rank, one panel per shape.

    python3 bench/dispatch/plot_dispatch.py bench/results/dispatch-h100-ep2.json [more.json ...]

Writes ``<json stem>.png`` beside each JSON. Runs anywhere with matplotlib
(no GPU): eager lines solid, CUDA-graph lines dashed, the speedup over
``torch_a2a`` annotated on the plugin's eager points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

STYLE = {  # contender: (label, colour)
    "flashinfer_onesided": ("flashinfer_onesided (plugin)", "tab:blue"),
    "moe_alltoall_raw": ("MoeAlltoAll raw", "tab:green"),
    "torch_a2a": ("torch_a2a (NCCL)", "tab:red"),
    "flashinfer_onesided_agree_r": ("plugin, R agreed (all-reduce)", "tab:purple"),
    "flashinfer_onesided_moe_ep": ("plugin via moe_ep (guard_slot)", "tab:cyan"),
}


def series(rows: list[dict[str, Any]], mode: str, name: str) -> tuple[list[int], list[float]]:
    pts = [(r["tokens_per_rank"], r[mode][name]["total_us"]) for r in rows if "total_us" in r[mode].get(name, {})]
    return [t for t, _ in pts], [u for _, u in pts]


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(path.read_text())
    shapes = list(dict.fromkeys(r["shape"] for r in report["results"]))
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(6.5 * max(1, len(shapes)), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in report["results"] if r["shape"] == shape]
        for name, (label, colour) in STYLE.items():
            for mode, ls in (("eager", "-"), ("graph", "--")):
                x, y = series(rows, mode, name)
                if x:
                    ax.plot(x, y, ls, marker="o", ms=3, color=colour, label=f"{label}, {mode}")
        for r in rows:
            main = r["eager"].get("flashinfer_onesided", {})
            if r.get("speedup_eager") and "total_us" in main:
                ax.annotate(f"{r['speedup_eager']:.2f}x", (r["tokens_per_rank"], main["total_us"]),
                            textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7, color="tab:blue")
        h, k, e = rows[0]["hidden"], rows[0]["top_k"], rows[0]["experts"]
        ax.set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="dispatch + combine (us, max over ranks)",
               title=f"{shape}: hidden {h}, top-{k} of {e} experts, bf16")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    bw = report.get("nccl_allreduce", {}).get("busbw_gbps")
    fig.suptitle(f"EP {report['ep']} on {report['gpu']}" + (f" (NCCL all-reduce busbw {bw:.0f} GB/s)" if bw else "")
                 + (" - DRY RUN, not a measurement" if report.get("dry_run") else ""), fontsize=10)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", type=Path)
    args = ap.parse_args()
    for path in args.json:
        print(f"wrote {plot(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
