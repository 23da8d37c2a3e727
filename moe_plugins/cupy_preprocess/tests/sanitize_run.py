"""A small safe-mode workload for compute-sanitizer (memcheck, racecheck, initcheck, synccheck).

Runs every kernel of the cupy preprocess (single-block path, the three grid kernels, several expert
windows, map in shared memory, in global memory and absent, int32 and int64 ids, a rank without local
experts) on fresh random inputs, and compares each result with the torch reference computed on the CPU
(so that only our kernels and torch's copies run on the GPU). Exits 1 on a mismatch; the sanitizer's
own exit code (``--error-exitcode``) reports what it found.

    compute-sanitizer --tool racecheck --error-exitcode 9 python3 moe_plugins/cupy_preprocess/tests/sanitize_run.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from preprocess_testlib import assert_matches, context, make_case, reference  # noqa: E402

from moe_plugin_cupy_preprocess.backend import CupyPreprocess  # noqa: E402

CASES = [
    # (E, ep_size, rank, sentinel, rows per rank, top_k, dtype, options)
    (256, 8, 1, "non_local", 40, 8, torch.int32, {}),  # block path, map in shared memory
    (256, 8, 7, "negative", 40, 8, torch.int64, {}),  # block path, invalid ids counted
    (64, 1, 0, "out_of_range", 500, 8, torch.int32, {}),  # block path, no map
    (256, 8, 2, "guard_slot", 700, 8, torch.int32, {"path": "grid"}),  # three grid kernels
    (20_000, 8, 3, "non_local", 700, 8, torch.int64, {"path": "grid"}),  # map in global memory
    (3000, 2, 1, "non_local", 1500, 4, torch.int32, {"path": "grid"}),  # two expert windows
    (3000, 2, 1, "non_local", 1500, 4, torch.int32, {"path": "block"}),  # two windows, one block
    (4, 8, 6, "negative", 30, 2, torch.int32, {"path": "grid"}),  # no local expert
]


def main() -> int:
    start = time.perf_counter()
    seed = time.time_ns() % 1_000_000
    for i, (e, ep, rank, sentinel, rows, k, dtype, options) in enumerate(CASES):
        case = make_case(e, ep, rank, sentinel, rows, k, seed=seed + i, dtype=dtype)
        local = case.local if case.local.expert_map is None else case.local.with_map(case.local.expert_map.cuda())
        ctx = context(case.placement, rank, local, "cuda:0", top_k=k, sentinel=case.sentinel)
        stage = CupyPreprocess(ctx, mode="safe", **options)
        ids = case.ids.cuda()
        for block_m in (None, 16):
            got = stage.preprocess(ids, block_m)
            torch.cuda.synchronize()
            try:
                assert_matches(got, reference(case, block_m), block_m, f"case {i} block_m={block_m}")
            except AssertionError as exc:
                print(f"MISMATCH case {i} {case.local.count} local experts {options}: {exc} (seed {seed})")
                return 1
    print(f"sanitize workload OK: {len(CASES)} cases x 2, seed {seed}, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
