"""Named MoE shapes and reproducible synthetic workloads (router output and int4 weights).

Every rank can draw its own tokens and its local experts' weights from the seed
alone, and a single-process dense reference draws exactly the same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backends.experts_torch import moe_reference
from .errors import ConfigError
from .quant import QuantizedExperts, synthetic_experts


@dataclass(frozen=True)
class MoEShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    group_size: int | None = 128


SHAPES = {s.name: s for s in (
    MoEShape("tiny", 256, 256, 8, 2),
    MoEShape("qwen3-30b-a3b", 2048, 768, 128, 8),
    MoEShape("mixtral-8x7b", 4096, 14336, 8, 2),
    MoEShape("deepseek-v3", 7168, 2048, 256, 8),
)}


def get_shape(name: str) -> MoEShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ConfigError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}") from None


def uneven_token_counts(tokens: int, ep_size: int) -> list[int]:
    """``tokens`` on rank 0 falling linearly to 0 on the last rank, so every rank but 0 gets padding."""
    if ep_size == 1:
        return [tokens]
    return [tokens * (ep_size - 1 - r) // (ep_size - 1) for r in range(ep_size)]


@dataclass(frozen=True)
class RouterOutput:
    hidden: torch.Tensor  # [T, H]
    topk_ids: torch.Tensor  # [T, K] int32, -1 where the router skipped a slot
    topk_weights: torch.Tensor  # [T, K] fp32


def synthetic_router_output(shape: MoEShape, tokens: int, seed: int, rank: int, dtype: torch.dtype,
                            skip_fraction: float = 0.05) -> RouterOutput:
    """Random hidden states and distinct top-k experts per token; about ``skip_fraction`` of
    slots (and, with 3+ tokens, all slots of the last token) are ``-1``, as routers emit for skipped tokens."""
    gen = torch.Generator().manual_seed(seed * 7919 + rank)
    hidden = torch.randn((tokens, shape.hidden_size), generator=gen).to(dtype)
    logits = torch.randn((tokens, shape.num_experts), generator=gen)
    top = torch.topk(logits, shape.top_k, dim=1)
    weights = torch.softmax(top.values, dim=1)
    ids = top.indices.to(torch.int32)
    skipped = torch.rand(ids.shape, generator=gen) < skip_fraction
    if tokens >= 3:
        skipped[-1] = True
    ids = torch.where(skipped, -1, ids)
    return RouterOutput(hidden, ids, weights)


def dense_reference(router: RouterOutput, shape: MoEShape, seed: int,
                    compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Single-process MoE over all experts (router-invalid slots skipped), in ``compute_dtype``; ``[T, H]``."""
    valid = (router.topk_ids >= 0) & (router.topk_ids < shape.num_experts)
    used = sorted(set(router.topk_ids[valid].tolist()))
    weights = experts_weights(shape, used, seed)
    index = torch.full((shape.num_experts,), -1, dtype=torch.int32)
    index[torch.tensor(used, dtype=torch.long)] = torch.arange(len(used), dtype=torch.int32)
    local = torch.where(valid, index[router.topk_ids.clamp(min=0).long()], -1)
    out = moe_reference(router.hidden.to(compute_dtype), router.topk_weights, local, weights, compute_dtype)
    return out


def experts_weights(shape: MoEShape, experts: Sequence[int], seed: int,
                    scale_dtype: torch.dtype = torch.float32) -> QuantizedExperts:
    """The synthetic int4 weights of ``experts`` (global ids), identical on every rank for a seed."""
    return synthetic_experts(experts, shape.hidden_size, shape.intermediate_size, shape.group_size, seed, scale_dtype)
