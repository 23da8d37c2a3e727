"""What plain torch streams take for the bytes of grid_fused's two memory phases, under the goal's timer.

grid_fused moves its bytes in two phases with a grid barrier between them: phase 1 reads the ids and writes
``local_ids`` (a copy's worth of traffic), phase 3 writes ``sorted_slot_ids`` and ``block_expert_ids`` (a
write-only stream; most of it is the tail past the total). For each N*K this times, in one process on fresh
inputs, the cupy preprocess itself and torch's kernels for the same bytes:

- ``phase1_copy_us``: a device-to-device copy of ``local_ids``' bytes (what phase 1 reads and writes);
- ``phase3_fill_us``: ``fill_`` of the layout's entries (what phase 3 writes);
- ``both_us``: the copy and then the fill, two launches in one timed call: a floor for any design that keeps
  the two phases apart (it pays no barrier, no counting and no ranking);
- ``same_bytes_us``: one copy of all the must-move bytes (half read, half written), as in bench_preprocess.py.

Every time is `bench_preprocess.median_us` (CUDA events, L2 flushed). If ``both_us`` is far below the preprocess,
the phases themselves leave room; if it is close, the two-phase design is at its floor.

    python3 bench/preprocess/stream_floors.py --sizes 1048576 4194304 8388608 [--ep 8] [--out floors.jsonl]
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_preprocess import (BLOCK_M, EP, append_jsonl, bench_stages, copy_gbps, median_us, routed_ids,
                             same_bytes_copy_us)

from moe_plugin_cupy_preprocess.plan import moved_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="N*K values")
    parser.add_argument("--ep", type=int, default=EP, help=f"expert-parallel ranks (default {EP})")
    parser.add_argument("--out", help="JSON lines file to append to")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("stream_floors.py needs a CUDA GPU")
    ctx, stage, _, gen = bench_stages(ep=args.ep)
    copy = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s, EP {args.ep}")
    for nk in args.sizes:
        ids = routed_ids(nk, ctx.sentinel, gen, args.ep)
        buffers = stage.make_buffers(*ids.shape, BLOCK_M)
        plan = buffers.plan
        must_move = moved_bytes(plan)
        ours_us = median_us(lambda: stage.preprocess_into(ids, buffers))
        src = torch.randint(0, 1 << 30, (nk,), dtype=torch.int32, device="cuda")
        dst = torch.empty_like(src)
        layout = torch.empty(plan.capacity + plan.num_blocks, dtype=torch.int32, device="cuda")

        def both() -> None:
            dst.copy_(src)
            layout.fill_(nk)

        row = {"num_slots": nk, "ep": args.ep, "kernels": list(plan.kernel_names), "ours_us": ours_us,
               "phase1_bytes": 8 * nk, "phase3_bytes": 4 * layout.numel(), "must_move_bytes": must_move,
               "phase1_copy_us": median_us(lambda: dst.copy_(src)),
               "phase3_fill_us": median_us(lambda: layout.fill_(nk)),
               "both_us": median_us(both), "same_bytes_us": same_bytes_copy_us(must_move), "copy_gbps": copy}
        print(f"N*K={nk:>8}: preprocess {ours_us:7.2f} us | phase-1 copy {row['phase1_copy_us']:6.2f} us "
              f"({row['phase1_bytes'] / row['phase1_copy_us'] / 1e3:5.0f} GB/s), phase-3 fill "
              f"{row['phase3_fill_us']:6.2f} us ({row['phase3_bytes'] / row['phase3_fill_us'] / 1e3:5.0f} GB/s), "
              f"both {row['both_us']:6.2f} us, one copy of all {row['same_bytes_us']:6.2f} us")
        append_jsonl(args.out, row)
        del ids, buffers, src, dst, layout
    return 0


if __name__ == "__main__":
    sys.exit(main())
