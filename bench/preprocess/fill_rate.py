"""How fast kernels of different shapes fill a buffer with one value, under the goal's timer.

grid_fused's phase 3 writes the tail of ``sorted_slot_ids`` (most of its 33.5 MB at N*K = 8M, EP 8) at about
2.5 TB/s where torch's ``fill_`` of the same bytes runs at about 3.1 (GPU runs 107 and 114). This separates the
possible reasons: each variant below writes the same int32 buffer with 16-byte stores and differs from the one
before it in one respect.

- ``torch_fill``: ``Tensor.fill_`` (many small blocks, scheduled by the hardware);
- ``grid_stride_plain`` / ``grid_stride_cs``: a co-resident grid shaped like grid_fused's (``--blocks-per-sm``
  blocks of ``--threads`` threads), grid-stride 16-byte stores, plain or evict-first (``__stcs``);
- ``pieces``: that grid taking 512-entry pieces from 32 queue counters, one request ahead, as grid_fused's phase 3
  did up to GPU run 116 (the counters are never reset: each launch advances each by the same amount, so the
  launch's pieces are its tickets modulo that amount);
- ``pieces_first_unasked``: the same, each warp's first piece taken without asking, as grid_fused does since run
  117 where a queue has a piece per warp (only at sizes where it does);
- ``grid_stride_cs_2x`` / ``pieces_2x``: the same with twice the threads per block (64 warps per SM at the
  default two blocks of 512).

Every time is `bench_preprocess.median_us` (CUDA events, L2 flushed); the graph column replays each call in a CUDA
graph. GB/s count the buffer's bytes once.

    python3 bench/preprocess/fill_rate.py --mb 33.5 [--out fill.jsonl]
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
from bench_preprocess import append_jsonl, graph_us, median_us

PIECE = 512
QUEUES = 32

SOURCE = r"""
extern "C" __global__ void grid_stride_plain(int4* a, long long nvec, int value) {
    const int4 w = make_int4(value, value, value, value);
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < nvec; v += step) a[v] = w;
}
extern "C" __global__ void grid_stride_cs(int4* a, long long nvec, int value) {
    const int4 w = make_int4(value, value, value, value);
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long v = blockIdx.x * (long long)blockDim.x + threadIdx.x; v < nvec; v += step) __stcs(a + v, w);
}
// Pieces of PIECE entries (n a multiple of PIECE); queue q owns pieces [q * per_queue, (q + 1) * per_queue). With
// unasked == 0 every piece is asked for and a launch advances a queue's counter by `stride` = per_queue + its
// warps; with unasked == its warps (<= per_queue), the i-th warp of the queue takes piece i without asking, a
// ticket t is piece unasked + t % stride, and a launch advances the counter by `stride` = per_queue.
extern "C" __global__ void pieces(int* a, int per_queue, int pieces_total, unsigned* counters, int stride,
                                  int unasked, int value) {
    const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int gw = blockIdx.x * nwarps + (threadIdx.x >> 5), queue = gw % QUEUES;
    const int first = queue * per_queue, mine = max(0, min(per_queue, pieces_total - first));
    unsigned* next = counters + 32 * queue;
    int requested = unasked ? gw / QUEUES : lane == 0 ? (int)(atomicAdd(next, 1u) % (unsigned)stride) : 0;
    const int4 w = make_int4(value, value, value, value);
    for (;;) {
        const int piece = __shfl_sync(0xffffffffu, requested, 0);
        if (piece >= per_queue) break;
        if (lane == 0) requested = unasked + (int)(atomicAdd(next, 1u) % (unsigned)stride);
        if (piece < mine) {
            int4* p = reinterpret_cast<int4*>(a + (long long)(first + piece) * PIECE);
#pragma unroll
            for (int j = 0; j < PIECE / 128; ++j) __stcs(p + j * 32 + lane, w);
        }
    }
}
""".replace("PIECE", str(PIECE)).replace("QUEUES", str(QUEUES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[33.5], help="buffer sizes, MB (10^6 bytes)")
    parser.add_argument("--threads", type=int, default=512, choices=(128, 256, 512),
                        help="threads per block of the co-resident grid (the 2x variants take twice as many)")
    parser.add_argument("--blocks-per-sm", type=int, default=2)
    parser.add_argument("--out", help="JSON lines file to append to")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fill_rate.py needs a CUDA GPU")
    try:
        import cupy
    except ImportError:
        raise SystemExit("fill_rate.py needs CuPy: pip install 'moe-plugin-cupy-preprocess[cuda13]' (or [cuda12])")
    module = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = sms * args.blocks_per_sm
    stream = lambda: cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)  # noqa: E731
    print(f"{torch.cuda.get_device_name()}: {sms} SMs, grid {grid} x {args.threads} threads")
    for mb in args.mb:
        pieces_total = max(1, round(mb * 1e6 / 4 / PIECE))
        n = pieces_total * PIECE
        buf = torch.empty(n, dtype=torch.int32, device="cuda")
        arr = cupy.from_dlpack(buf)
        nvec, value = cupy.int64(n // 4), cupy.int32(7)
        per_queue = -(-pieces_total // QUEUES)

        def launch(name: str, blocks: int, threads: int, *kargs: object) -> Callable[[], None]:
            fn = module.get_function(name)
            return lambda: fn((blocks,), (threads,), kargs, stream=stream())

        def pieces(threads: int, unasked: bool = False) -> Callable[[], None]:
            warps_per_queue = grid * (threads // 32) // QUEUES  # grid warps are a multiple of QUEUES here
            counters = cupy.zeros(32 * QUEUES, dtype=cupy.uint32)  # one 128-byte line per queue, per variant
            stride = per_queue if unasked else per_queue + warps_per_queue
            return launch("pieces", grid, threads, arr, cupy.int32(per_queue), cupy.int32(pieces_total), counters,
                          cupy.int32(stride), cupy.int32(warps_per_queue if unasked else 0), value)

        variants = {
            "torch_fill": lambda: buf.fill_(7),
            "grid_stride_plain": launch("grid_stride_plain", grid, args.threads, arr, nvec, value),
            "grid_stride_cs": launch("grid_stride_cs", grid, args.threads, arr, nvec, value),
            "grid_stride_cs_2x": launch("grid_stride_cs", grid, 2 * args.threads, arr, nvec, value),
            "pieces": pieces(args.threads),
            "pieces_2x": pieces(2 * args.threads),
        }
        if per_queue >= grid * args.threads // 32 // QUEUES:  # a piece per warp: the first ones unasked
            variants["pieces_first_unasked"] = pieces(args.threads, unasked=True)
        for name, fn in variants.items():
            buf.zero_()
            fn()
            torch.cuda.synchronize()
            wrong = int((buf != 7).sum())
            if wrong:
                raise SystemExit(f"{name} left {wrong} of {n} entries unwritten")
            us = median_us(fn)
            row = {"mb": n * 4 / 1e6, "variant": name, "us": us, "gbps": n * 4 / us / 1e3, "graph_us": graph_us(fn),
                   "grid": grid, "threads": args.threads}
            print(f"{row['mb']:7.1f} MB  {name:18s} {us:7.2f} us  {row['gbps']:6.0f} GB/s  "
                  f"graph {row['graph_us']:.2f} us", flush=True)
            append_jsonl(args.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
