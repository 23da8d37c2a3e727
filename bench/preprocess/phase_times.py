"""Where grid_fused's time goes at large N*K: the same call with and without the aligned layout, next to copies.

``block_m=None`` runs phase 1 (map, local ids, counts), the grid barrier and the count exchange, but no
placement (phase 3): the difference to ``block_m=16`` is what building the aligned layout costs. Next to
them, under the same timer (`bench_preprocess.median_us`, L2 flushed): torch's device-to-device copy of the
ids (the phase-1 stream: read N*K ints, write N*K ints) and of the bytes the whole preprocess must move, and
the benchmark's one-int-per-thread copy floor. Routing as in `bench_preprocess.py`. Prints one JSON line
per size.

    python3 bench/preprocess/phase_times.py --sizes 1048576 4194304 8388608
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from bench_preprocess import (
    BLOCK_M,
    bench_stages,
    check,
    copy_floor_step,
    median_us,
    routed_ids,
    same_bytes_copy_us,
)
from moe_plugin_cupy_preprocess.plan import moved_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="N*K values")
    args = parser.parse_args()
    ctx, stage, peer, gen = bench_stages()
    sentinel = int(ctx.sentinel)
    for nk in args.sizes:
        ids = routed_ids(nk, sentinel, gen)
        aligned = stage.make_buffers(ids.shape[0], ids.shape[1], BLOCK_M)
        bare = stage.make_buffers(ids.shape[0], ids.shape[1], None)
        check(stage.preprocess_into(ids, aligned), peer.preprocess(ids, BLOCK_M))
        got = stage.preprocess_into(ids, bare)
        want = peer.preprocess(ids, None)
        if not (torch.equal(got.local_ids, want.local_ids) and torch.equal(got.expert_counts, want.expert_counts)):
            raise SystemExit("MISMATCH without the aligned layout")
        must = moved_bytes(aligned.plan)
        out = torch.empty_like(ids)
        floor = copy_floor_step(ids, out)
        row = {"num_slots": nk, "must_move_bytes": must,
               "aligned_us": median_us(lambda: stage.preprocess_into(ids, aligned)),
               "no_layout_us": median_us(lambda: stage.preprocess_into(ids, bare)),
               "torch_copy_ids_us": median_us(lambda: out.copy_(ids)),
               "torch_copy_must_move_us": same_bytes_copy_us(must),
               "copy_floor_us": median_us(lambda: stage.kernels.run((floor,)))}
        row["layout_us"] = row["aligned_us"] - row["no_layout_us"]
        row["must_move_copy_frac_of_3000"] = must / (row["torch_copy_must_move_us"] * 1e-6) / 3e12
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
