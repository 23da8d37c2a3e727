"""Prepare backend ``passthrough``: no quantization, but router-invalid slots are neutralised.

Rule for a slot whose id lies outside ``[0, E)`` (routers emit ``-1`` for
skipped tokens): its weight becomes 0 and its id becomes

1. the first valid id of the same token, when the token has one: the token is
   sent to that expert's rank anyway, so the slot adds no traffic;
2. otherwise (every slot of the token is invalid) ``self_expert``: the first
   expert owned by this source rank, so the row only travels to this rank
   itself; if this rank owns no expert, the lowest expert id (one row of traffic).

So no invalid id ever travels, and no rank receives an invalid token as a real
row (FlashInfer PR #4017 sent them to rank 0). The rewritten slot is computed
with weight 0 and contributes nothing. No host sync.
"""

from __future__ import annotations

import torch

from ..contract import PreparedTokens, check_router_output
from ..hookspecs import BuildContext


class PassthroughPrepare:
    def __init__(self, ctx: BuildContext) -> None:
        self.global_num_experts = ctx.placement.global_num_experts
        owned = [e for e, r in enumerate(ctx.placement.owner) if r == ctx.rank]
        self.self_expert = owned[0] if owned else 0

    def prepare(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PreparedTokens:
        check_router_output(hidden, topk_ids, topk_weights)
        ids, weights = neutralise_invalid_slots(topk_ids, topk_weights.to(torch.float32),
                                                self.global_num_experts, self.self_expert)
        return PreparedTokens(hidden, ids, weights)


def neutralise_invalid_slots(topk_ids: torch.Tensor, topk_weights: torch.Tensor, global_num_experts: int,
                             self_expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the module's rule; returns new int32 ids and fp32 weights (inputs untouched)."""
    valid = (topk_ids >= 0) & (topk_ids < global_num_experts)
    if topk_ids.shape[1] == 0:
        return topk_ids.to(torch.int32), topk_weights
    first_valid_slot = valid.to(torch.int8).argmax(dim=1, keepdim=True)
    first_valid_id = topk_ids.gather(1, first_valid_slot)
    fallback = torch.where(valid.any(dim=1, keepdim=True), first_valid_id, torch.full_like(first_valid_id, self_expert))
    ids = torch.where(valid, topk_ids, fallback).to(torch.int32)
    weights = torch.where(valid, topk_weights, torch.zeros_like(topk_weights))
    return ids, weights
