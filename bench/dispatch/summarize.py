#!/usr/bin/env python3
"""Summaries for ``scripts/gpu_dispatch.sh``.

    summarize.py merge-gpu <dir of per-rank JSON> <out.json>   merge the GPU suite's per-rank results
    summarize.py gpu <merged.json>                              outcome counts per rank, failing tests
    summarize.py bench <dir of dispatch-*.json>                 the benchmark tables and goal verdicts
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path


def merge_gpu(src: Path, dst: Path) -> None:
    ranks = {p.stem.rsplit("rank", 1)[-1]: json.loads(p.read_text()) for p in sorted(src.glob("*.json"))}
    dst.write_text(json.dumps({"ranks": ranks}, indent=1))


def gpu(path: Path) -> None:
    data = json.loads(path.read_text())["ranks"] if path.exists() else {}
    if not data:
        print("GPU suite: no per-rank results (see the gpu-tests log)")
        return
    for rank, res in sorted(data.items(), key=lambda kv: int(kv[0])):
        counts = collections.Counter(r["outcome"] for r in res["results"])
        print(f"GPU suite rank {rank} ({res.get('device')}, exit {res.get('exitstatus')}): "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    failed: dict[str, str] = {}
    for res in data.values():
        for r in res["results"]:
            if r["outcome"] == "failed" and r["test"] not in failed:
                lines = [line for line in r["detail"].strip().splitlines() if line.strip()]
                failed[r["test"]] = lines[-1][:220] if lines else ""
    for name, why in list(failed.items())[:12]:
        print(f"  FAILED {name}: {why}")


def bench(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_dispatch import table

    files = sorted(folder.glob("dispatch-*.json"))
    if not files:
        print("bench: no JSON written (see the bench log)")
    for f in files:
        print(table(json.loads(f.read_text())))


def main() -> int:
    cmd, *args = sys.argv[1:]
    if cmd == "merge-gpu":
        merge_gpu(Path(args[0]), Path(args[1]))
    elif cmd == "gpu":
        gpu(Path(args[0]))
    elif cmd == "bench":
        bench(Path(args[0]))
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
