"""Host time per call of the cupy preprocess's Python side, on a real GPU, same process, interleaved rounds.

What a caller pays on the host for each kind of call (the kernels are the same in all three):

- ``preprocess``: `CupyPreprocess.preprocess`, new output tensors per call (what hostcore's layer calls). They are
  views of one allocation, and the stage re-points one launch sequence at it (`launch.Sequence.rebase`).
- ``rebuilt``: the per-call work that `preprocess` did before commit 9fcd918, timed for comparison: eleven
  allocations (`tests/preprocess_testlib.separate_buffers`) and freshly packed launch arguments.
- ``into``: `CupyPreprocess.preprocess_into` on preallocated buffers (what a CUDA graph replays).

Per size (routing as in `bench_preprocess.py`), ``--rounds`` rounds each time ``--calls`` calls of every kind, then
synchronise; the median over the rounds is reported, in microseconds per call. With GPU work shorter than the host
work (every size here) this is the host's time. One JSON line per size.

    python3 bench/preprocess/host_overhead.py --sizes 8 16384 1048576 --out host.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from bench_preprocess import BLOCK_M, append_jsonl, bench_stages, check, routed_ids, wall_us

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "moe_plugins" / "cupy_preprocess" / "tests"))
from preprocess_testlib import separate_buffers  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16384, 1 << 20], help="N*K values")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--out", help="JSON lines file to append to")
    args = parser.parse_args()

    ctx, stage, peer, gen = bench_stages()
    for nk in args.sizes:
        ids = routed_ids(nk, int(ctx.sentinel), gen)
        plan = stage.plan(ids.shape[0], ids.shape[1], ids.dtype, BLOCK_M)
        buffers = stage.make_buffers(ids.shape[0], ids.shape[1], BLOCK_M)

        def rebuilt() -> Any:
            out = separate_buffers(plan, ids.device)
            stage._launch(stage._sequence(ids, out), ids, out)
            return out.routing(count_invalid=True)

        kinds = {"preprocess": lambda: stage.preprocess(ids, BLOCK_M), "rebuilt": rebuilt,
                 "into": lambda: stage.preprocess_into(ids, buffers)}
        for name, fn in kinds.items():
            check(fn(), peer.preprocess(ids, BLOCK_M))
        times: dict[str, list[float]] = {name: [] for name in kinds}
        for _ in range(args.rounds):
            for name, fn in kinds.items():
                times[name].append(wall_us(fn, args.calls))
        row = {"num_slots": nk, "kernels": list(plan.kernel_names),
               **{f"{name}_us": statistics.median(t) for name, t in times.items()},
               **{f"{name}_rounds_us": t for name, t in times.items()}}
        print(f"N*K={nk:>8} {plan.kernel_names[0]:>24}: " +
              ", ".join(f"{name} {row[name + '_us']:6.1f} us" for name in kinds), flush=True)
        append_jsonl(args.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
