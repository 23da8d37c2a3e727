"""Run preprocess=cupy a few times per size, for a profiler (`ncu`) to look inside the kernels.

Same routing as `bench_preprocess.py` (E = 256, top-8, EP 8 unless ``--ep``, rank 0 with 32 local experts through a
shared-memory map, block_m = 16, int32 ids, a quarter of each source slice padding). Every size is
checked against the torch reference first. Typical use on the GPU host:

    ncu --clock-control none --set full -k regex:'preprocess|grid_' \
        python3 bench/preprocess/profile_preprocess.py --sizes 8 2048 1048576 8388608
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_preprocess import BLOCK_M, EP, bench_stages, check, routed_ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="N*K values")
    parser.add_argument("--calls", type=int, default=2, help="preprocess calls per size after the check")
    parser.add_argument("--ep", type=int, default=EP, help=f"expert-parallel ranks (default {EP})")
    args = parser.parse_args()

    ctx, stage, peer, gen = bench_stages(ep=args.ep)
    sentinel = int(ctx.sentinel)
    for nk in args.sizes:
        ids = routed_ids(nk, sentinel, gen, args.ep)
        buffers = stage.make_buffers(ids.shape[0], ids.shape[1], BLOCK_M)
        check(stage.preprocess_into(ids, buffers), peer.preprocess(ids, BLOCK_M))
        for _ in range(args.calls):
            stage.preprocess_into(ids, buffers)
        torch.cuda.synchronize()
        print(f"N*K={nk}: path {buffers.plan.path}, kernels {list(buffers.plan.kernel_names)}, "
              f"blocks {buffers.plan.grid_blocks}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
