#!/usr/bin/env python3
"""Small cases of the marlin backend for compute-sanitizer (memcheck / racecheck): padding, maps, block sizes, split-K.

Run as ``compute-sanitizer --tool memcheck python3 bench/marlin/sanitize_case.py``; exits non-zero if a
result is wrong (the sanitizer itself reports memory errors).
"""

from __future__ import annotations

import sys

import torch

from hostcore import BuildContext, ExpertPlacement, LocalRouting
from hostcore.backends.experts_torch import moe_reference
from hostcore.backends.preprocess_torch import align_blocks, expert_counts
from hostcore.conformance import valid_sentinels
from hostcore.conformance.data import expected_local_ids, padding_mask, received_ids
from hostcore.quant import synthetic_experts


def case(h: int, i: int, e: int, top_k: int, ep: int, rows: list[int], r: int, block_m: int, use_layout: bool,
         group: int | None, dtype: torch.dtype, tiles: dict | None = None) -> float:
    from moe_plugin_marlin.stage import MarlinExperts

    placement = ExpertPlacement.round_robin(e, ep)
    rank = ep - 1
    local = placement.local_experts(rank, use_map=ep > 1, device="cuda")
    weights = synthetic_experts(local.global_ids(), h, i, group, seed=3, scale_dtype=dtype)
    ctx = BuildContext(rank=rank, ep_size=ep, device=torch.device("cuda"), placement=placement, local=local,
                       hidden_size=h, top_k=top_k, dtype=dtype, max_tokens_per_rank=r, weights=weights)
    stage = MarlinExperts(ctx, block_m=block_m)
    stage.tile_override = tiles or {}
    gen = torch.Generator().manual_seed(1)
    pad = valid_sentinels(placement.local_experts(rank, use_map=ep > 1))[-1]
    ids = received_ids(gen, rows, r, top_k, e, pad.sentinel)
    local_ids, _ = expected_local_ids(ids, pad.local)
    n = ids.shape[0]
    hidden = torch.randn((n, h), generator=gen).to(dtype)
    topw = torch.rand((n, top_k), generator=gen)
    mask = padding_mask(rows, r)
    hidden[mask] = float("nan")
    topw[mask] = float("nan")
    hidden, topw, local_ids = hidden.cuda(), topw.cuda(), local_ids.cuda()
    counts = expert_counts(local_ids, local.count)
    aligned = align_blocks(local_ids, counts, stage.block_m) if use_layout else None
    out = stage.compute(hidden, topw, LocalRouting(local_ids, counts, None, aligned))
    ref = moe_reference(hidden.float(), topw, local_ids, weights.to("cuda"), torch.float64).double()
    err = float((out.double() - ref).norm() / ref.norm())
    print(f"H={h} I={i} E={e} ep={ep} rows={rows} block_m={block_m} layout={use_layout} g={group} {dtype}: "
          f"tiles={tiles}: rel err {err:.2e}", flush=True)
    return err


def main() -> int:
    errs = [
        case(256, 256, 8, 2, 2, [16, 5], 16, 0, False, 128, torch.bfloat16),
        case(256, 256, 8, 2, 2, [16, 5], 16, 16, True, None, torch.float16),
        case(256, 128, 16, 4, 4, [40, 3, 0, 17], 40, 64, False, 64, torch.bfloat16),
        case(1024, 4096, 4, 2, 1, [3], 3, 0, False, 128, torch.bfloat16),  # GEMM2 split along K
        # every tile width / block size explicitly (the heuristic may not pick them on these shapes)
        case(512, 512, 4, 2, 1, [40], 40, 16, False, 128, torch.bfloat16, {"gemm1": (2, 1), "gemm2": (2, 2)}),
        case(512, 512, 4, 2, 1, [40], 40, 32, True, 128, torch.bfloat16, {"gemm1": (2, 1), "gemm2": (4, 1)}),
        case(512, 512, 4, 2, 1, [40], 40, 32, False, None, torch.float16, {"gemm1": (4, 1), "gemm2": (2, 1)}),
        case(512, 512, 4, 2, 1, [40], 40, 16, False, None, torch.bfloat16, {"gemm1": (1, 1), "gemm2": (1, 2)}),
    ]
    bad = [e for e in errs if not e < 1e-2]
    print("sanitize cases:", "ok" if not bad else f"{len(bad)} wrong results")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
