#!/usr/bin/env python3
"""Turn the GPU sweep's JSON lines (``MARLIN_RESULTS_JSONL``) into the GPU_RESULTS.md table."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(jsonl: str, out: str, header: str) -> None:
    recs = [json.loads(line) for line in open(jsonl) if line.strip()]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        groups[(r["shape"], r["dtype"], r["ep"], r["placement"], r["local_experts"])].append(r)
    lines = [header, "",
             f"{len(recs)} cases, {sum(r['ok'] for r in recs)} pass (||out - ref|| / ||ref|| < 1e-2 vs moe_reference "
             "float64, finite outputs, rows without a local slot exactly 0; NaN padding rows and NaN-poisoned "
             "workspaces).", "",
             "| shape | dtype | EP (placement, local experts) | M rows/source | sentinels | layouts | max rel err | "
             "tiles (M: gemm1 / gemm2) | pass |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (shape, dtype, ep, kind, nloc), rs in groups.items():
        ms = ",".join(str(r["rows_per_source"]) for r in rs)
        sents = ", ".join(sorted({r["sentinel"] for r in rs}))
        lays = ", ".join(sorted({r["layout"] for r in rs}))
        worst = max(r["rel_err"] for r in rs)
        tiles = "; ".join(f"{r['rows_per_source']}: {r['gemm1']} / {r['gemm2']}" for r in rs
                          if r["rows_per_source"] in (1, 16, 256, 1024))
        ep_s = "1 (no map)" if ep == 1 else f"{ep} ({kind}, {nloc})"
        ok = sum(r["ok"] for r in rs)
        lines.append(f"| {shape} | {dtype} | {ep_s} | {ms} | {sents} | {lays} | {worst:.2e} | {tiles} | "
                     f"{ok}/{len(rs)} |")
    open(out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "# GPU results")
