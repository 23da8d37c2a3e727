"""prepare=passthrough: router-invalid slots leave with weight 0 and a target that adds no traffic."""

from __future__ import annotations

import torch
from helpers import context

from hostcore.backends.prepare import PassthroughPrepare
from hostcore.placement import ExpertPlacement


def test_invalid_slots_copy_a_valid_id_of_the_same_token_with_weight_zero() -> None:
    placement = ExpertPlacement.contiguous(8, 4)
    prep = PassthroughPrepare(context(placement, rank=2))
    ids = torch.tensor([[3, -1, 6], [-1, 9, -1], [-1, -1, -1], [1, 2, 5]], dtype=torch.int64)
    weights = torch.rand(4, 3)
    out = prep.prepare(torch.randn(4, 16), ids, weights)
    assert out.topk_ids.dtype == torch.int32
    assert out.topk_ids.tolist() == [[3, 3, 6], [4, 4, 4], [4, 4, 4], [1, 2, 5]]
    expected_w = torch.where((ids >= 0) & (ids < 8), weights, torch.zeros(()))
    assert torch.equal(out.topk_weights, expected_w)


def test_rewritten_slots_add_no_destination_rank() -> None:
    """Router-emitted -1 never reaches another rank as a real row: the set of target ranks is unchanged
    for tokens with a valid slot, and a fully skipped token targets only its own rank."""
    torch.manual_seed(0)
    placement = ExpertPlacement.round_robin(16, 4)
    owner = placement.owner_tensor()
    for rank in range(4):
        prep = PassthroughPrepare(context(placement, rank=rank))
        ids = torch.randint(0, 16, (64, 4))
        ids[torch.rand(64, 4) < 0.4] = -1
        ids[::7] = -1
        out = prep.prepare(torch.randn(64, 8), ids, torch.rand(64, 4))
        for t in range(64):
            valid = [int(e) for e in ids[t] if e >= 0]
            targets = {int(owner[e]) for e in out.topk_ids[t]}
            assert targets == ({int(owner[e]) for e in valid} if valid else {rank})
