"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from hostcore.hookspecs import BuildContext
from hostcore.placement import ExpertPlacement


def context(placement: ExpertPlacement, rank: int = 0, use_map: bool = True, sentinel: int | None = None,
            hidden_size: int = 256, top_k: int = 2, weights=None, dtype: torch.dtype = torch.float32) -> BuildContext:
    return BuildContext(rank=rank, ep_size=placement.ep_size, device=torch.device("cpu"), placement=placement,
                        local=placement.local_experts(rank, use_map), hidden_size=hidden_size, top_k=top_k,
                        dtype=dtype, max_tokens_per_rank=64, sentinel=sentinel, weights=weights)
