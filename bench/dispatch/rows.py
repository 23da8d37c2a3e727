"""The project's common benchmark rows for a `bench_dispatch.py` report.

``rows`` has one entry per (shape, tokens per rank): ``ours_us`` is the plugin's
eager dispatch+combine as the pipeline calls it, ``peer_us`` the host's
``torch_a2a`` over NCCL, ``speedup = peer_us / ours_us``. ``roofline_frac`` is
the time the bytes that leave the rank take at the NCCL all-reduce bus bandwidth
measured on the same host, over ``ours_us``: a ceiling measured the same day,
not a datasheet number. With uniform routing ``(ep - 1) / ep`` of the dispatched
and combined bytes cross to other ranks; the rest is a local copy. Extra keys: raw ``MoeAlltoAll`` and the
CUDA-graph totals.

    python3 bench/dispatch/rows.py REPORT.json    # adds bench/date/rows to a report written without them
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MAIN, RAW, PEER = "flashinfer_onesided", "moe_alltoall_raw", "torch_a2a"


def _total(row: dict[str, Any], mode: str, name: str) -> float | None:
    return row.get(mode, {}).get(name, {}).get("total_us")


def standard_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    busbw = report.get("nccl_allreduce", {}).get("busbw_gbps")
    rows = []
    for r in report["results"]:
        ours, peer, raw = _total(r, "eager", MAIN), _total(r, "eager", PEER), _total(r, "eager", RAW)
        if ours is None or peer is None:
            continue
        ep = report["ep"]
        moved = (r["bytes_per_rank"]["dispatch"] + r["bytes_per_rank"]["combine"]) * (ep - 1) / ep
        rows.append({
            "case": f"{r['shape']} T={r['tokens_per_rank']}", "ours_us": ours, "peer": PEER, "peer_us": peer,
            "speedup": peer / ours, "roofline_frac": (moved / (busbw * 1e3)) / ours if busbw else None,
            "raw_us": raw, "ours_over_raw": ours / raw if raw else None,
            "dispatch_us": r["eager"][MAIN]["dispatch_us"], "combine_us": r["eager"][MAIN]["combine_us"],
            "graph_ours_us": _total(r, "graph", MAIN), "graph_raw_us": _total(r, "graph", RAW),
        })
    return rows


def with_standard_rows(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with the common ``bench``, ``date`` and ``rows`` keys added in front."""
    head = {"bench": "dispatch", "gpu": report["gpu"], "date": report["time"].split()[0],
            "rows": standard_rows(report)}
    return {**head, **{k: v for k, v in report.items() if k not in head}}


if __name__ == "__main__":
    for name in sys.argv[1:]:
        path = Path(name)
        path.write_text(json.dumps(with_standard_rows(json.loads(path.read_text())), indent=1))
        print(f"added {len(json.loads(path.read_text())['rows'])} rows to {path}")
