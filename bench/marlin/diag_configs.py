#!/usr/bin/env python3
"""Run every tile configuration once on a small case and check it against the float64 reference.

``python3 bench/marlin/diag_configs.py`` prints one line per (block_m, gemm, n_warps): ok / wrong / crash.
Each configuration runs in its own process (a CUDA error poisons the context), with CUDA_LAUNCH_BLOCKING.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def one(block_m: int, which: str, nw: int) -> None:
    from hostcore import BuildContext, ExpertPlacement, LocalRouting
    from hostcore.backends.experts_torch import moe_reference
    from hostcore.backends.preprocess_torch import expert_counts
    from hostcore.quant import synthetic_experts
    from moe_plugin_marlin.stage import MarlinExperts, describe_tiles

    h, i, e, k, rows = 512, 512, 4, 2, 40
    placement = ExpertPlacement.contiguous(e, 1)
    local = placement.local_experts(0, use_map=False)
    w = synthetic_experts(range(e), h, i, 128, seed=1, scale_dtype=torch.bfloat16)
    ctx = BuildContext(rank=0, ep_size=1, device=torch.device("cuda"), placement=placement, local=local,
                       hidden_size=h, top_k=k, dtype=torch.bfloat16, max_tokens_per_rank=rows, weights=w)
    st = MarlinExperts(ctx, block_m=block_m)
    st.tile_override = {which: (nw, 1)}
    gen = torch.Generator().manual_seed(0)
    hid = torch.randn(rows, h, generator=gen).bfloat16().cuda()
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(rows)]).int().cuda()
    tw = torch.rand(rows, k, generator=gen).cuda()
    out = st.compute(hid, tw, LocalRouting(ids, expert_counts(ids, e)))
    torch.cuda.synchronize()
    ref = moe_reference(hid.float(), tw, ids, w.to("cuda"), torch.float64).double()
    err = float((out.double() - ref).norm() / ref.norm())
    print(json.dumps({"err": err, "tiles": describe_tiles(st, rows, k)}))


def main() -> None:
    if len(sys.argv) > 1:
        one(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
        return
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for bm, nws in ((16, (4, 2, 1)), (32, (4, 2)), (64, (4,))):
        for which in ("gemm1", "gemm2"):
            for nw in nws:
                r = subprocess.run([sys.executable, __file__, str(bm), which, str(nw)], env=env, capture_output=True,
                                   text=True, timeout=120)
                last = (r.stdout.strip().splitlines() or [""])[-1]
                status = "crash" if r.returncode else ("ok" if json.loads(last)["err"] < 1e-2 else "wrong")
                why = "" if not r.returncode else [l for l in r.stderr.splitlines() if "Error" in l][-1:]
                print(f"bm{bm} {which} tn{64 * nw}: {status} {last if not r.returncode else why}", flush=True)


if __name__ == "__main__":
    main()
