"""preprocess=torch: map lookup, counts, the aligned layout, and the three modes."""

from __future__ import annotations

import pytest
import torch
from helpers import context

from hostcore.backends.preprocess_torch import TorchPreprocess
from hostcore.contract import aligned_capacity
from hostcore.errors import ContractError
from hostcore.placement import ExpertPlacement


def routed(placement: ExpertPlacement, rank: int, mode: str = "safe", use_map: bool = True) -> TorchPreprocess:
    return TorchPreprocess(context(placement, rank=rank, use_map=use_map), mode=mode)


def check_layout(local_ids: torch.Tensor, routing, block_m: int) -> None:
    layout = routing.aligned
    flat = local_ids.reshape(-1)
    n = flat.numel()
    total = int(layout.num_slots_post_padded)
    assert total % block_m == 0 and layout.sorted_slot_ids.numel() == aligned_capacity(n, routing.expert_counts.numel(), block_m)
    used = layout.sorted_slot_ids[:total]
    real = used[used < n]
    assert sorted(real.tolist()) == sorted((flat >= 0).nonzero().reshape(-1).tolist()), "each valid slot once"
    assert bool((layout.sorted_slot_ids[total:] == n).all())
    for b, e in enumerate(layout.block_expert_ids.tolist()):
        block = layout.sorted_slot_ids[b * block_m:(b + 1) * block_m]
        if b * block_m >= total:
            assert e == -1
            continue
        slots = block[block < n]
        assert bool((flat[slots.long()] == e).all()), f"block {b} holds slots of another expert than {e}"
    experts = layout.block_expert_ids[: total // block_m].tolist()
    assert experts == sorted(experts)


@pytest.mark.parametrize("ep_size, placement_kind", [(1, "contiguous"), (2, "contiguous"), (4, "round_robin"),
                                                     (8, "contiguous")])
@pytest.mark.parametrize("block_m", [1, 8, 16])
def test_lookup_counts_and_layout_on_random_ids(ep_size: int, placement_kind: str, block_m: int) -> None:
    torch.manual_seed(ep_size * 100 + block_m)
    e = 32
    placement = getattr(ExpertPlacement, placement_kind)(e, ep_size)
    for rank in range(ep_size):
        table = placement.expert_map(rank)
        sentinel = int((table == -1).nonzero()[0]) if ep_size > 1 else e
        ids = torch.randint(0, e, (40, 4), dtype=torch.int32)
        ids[30:] = sentinel
        routing = routed(placement, rank, use_map=ep_size > 1).preprocess(ids, block_m)
        expected = table[ids.long()] if ep_size > 1 else torch.where(ids < e, ids, -1)
        assert torch.equal(routing.local_ids, expected)
        assert routing.expert_counts.tolist() == [int((expected == i).sum()) for i in range(placement.local_count(rank))]
        assert int(routing.invalid_count) == 0, "valid sentinels are not invalid ids"
        check_layout(routing.local_ids, routing, block_m)


def test_modes_on_a_negative_sentinel() -> None:
    placement = ExpertPlacement.contiguous(4, 2)
    ids = torch.tensor([[2, 3], [-1, -1]], dtype=torch.int32)  # row 1 is padding with the legacy -1
    safe = routed(placement, 1).preprocess(ids)
    assert safe.local_ids.tolist() == [[0, 1], [-1, -1]] and int(safe.invalid_count) == 2
    faithful = routed(placement, 1, "faithful").preprocess(ids)
    assert faithful.local_ids.tolist() == [[0, 1], [1, 1]], "expert_map[-1] wraps to the last entry: local 1"
    with pytest.raises(ContractError, match=r"2 ids outside the expert map int32\[4\].*\[1, 0\]=-1, \[1, 1\]=-1"):
        routed(placement, 1, "checked").preprocess(ids)


def test_faithful_refuses_ids_past_the_map() -> None:
    ids = torch.tensor([[4, 0]], dtype=torch.int32)
    with pytest.raises(ContractError, match="past the end"):
        routed(ExpertPlacement.contiguous(4, 2), 0, "faithful").preprocess(ids)


def test_without_a_map_the_local_range_is_used() -> None:
    placement = ExpertPlacement.contiguous(8, 2)
    ids = torch.tensor([[4, 7], [0, 8], [-1, 5]], dtype=torch.int32)
    routing = routed(placement, 1, use_map=False).preprocess(ids)
    assert routing.local_ids.tolist() == [[0, 3], [-1, -1], [-1, 1]]
    assert int(routing.invalid_count) == 1
    with pytest.raises(ContractError, match="negative ids"):
        routed(placement, 1, "checked", use_map=False).preprocess(ids)


def test_bad_input_is_named() -> None:
    with pytest.raises(ContractError, match="int32/int64"):
        routed(ExpertPlacement.contiguous(4, 2), 0).preprocess(torch.zeros(2, 2))
