#!/usr/bin/env python3
"""Launch the marlin GEMMs of a few benchmark cases once each, for Nsight Compute (``ncu``) to profile."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_marlin import build_ours, make_inputs, random_gptq  # noqa: E402

from hostcore import LocalRouting  # noqa: E402
from hostcore.workload import SHAPES  # noqa: E402

CASES = [("qwen3-30b-a3b", 16), ("mixtral-8x7b", 16), ("mixtral-8x7b", 1), ("qwen3-30b-a3b", 1)]

for name, m in CASES:
    s = SHAPES[name]
    w = random_gptq(s.num_experts, s.hidden_size, s.intermediate_size, s.group_size, torch.bfloat16, 1)
    stage = build_ours(s, w, m, torch.bfloat16)
    hidden, ids, topw = make_inputs(s, m, torch.bfloat16, 2)
    from moe_plugin_marlin.stage import describe_tiles
    print(name, m, describe_tiles(stage, m, s.top_k), flush=True)
    stage.compute(hidden, topw, LocalRouting(ids, torch.zeros(s.num_experts, dtype=torch.int32, device="cuda")))
    torch.cuda.synchronize()
    del stage, w
    torch.cuda.empty_cache()
