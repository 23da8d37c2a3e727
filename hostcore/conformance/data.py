"""Random test data in the received layout: global ids with padding rows, invalid ids, activations.

All generators take a `torch.Generator` (CPU) so a case is reproducible from
its seed; move results to the device under test afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..placement import LocalExperts


def received_ids(gen: torch.Generator, rows_per_source: Sequence[int], rows_per_rank: int, top_k: int,
                 num_experts: int, sentinel: int) -> torch.Tensor:
    """``int32 [ep_size * R, K]``: source ``s``'s first ``rows_per_source[s]`` rows hold random global ids
    (distinct within a row when ``K <= E``), the rest of each slice is padding filled with ``sentinel``."""
    ep = len(rows_per_source)
    ids = torch.full((ep, rows_per_rank, top_k), sentinel, dtype=torch.int32)
    for s, count in enumerate(rows_per_source):
        for i in range(count):
            if top_k <= num_experts:
                ids[s, i] = torch.randperm(num_experts, generator=gen)[:top_k].to(torch.int32)
            else:
                ids[s, i] = torch.randint(0, num_experts, (top_k,), generator=gen, dtype=torch.int32)
    return ids.reshape(ep * rows_per_rank, top_k)


def padding_mask(rows_per_source: Sequence[int], rows_per_rank: int) -> torch.Tensor:
    """``bool [ep_size * R]``: True for padding rows."""
    r = torch.arange(rows_per_rank)
    return torch.cat([r >= count for count in rows_per_source]) if rows_per_source else torch.zeros(0, dtype=torch.bool)


def invalid_values(local: LocalExperts) -> list[int]:
    """Ids a safe preprocess must skip and count: negative, and (with a map) at or past its end.

    Without a map, ids ``>= E`` cannot be told from a valid sentinel, so only
    negative ids are invalid there.
    """
    values = [-1, -2, -(local.global_num_experts + 3), -(2**31)]
    if local.expert_map is not None:
        size = int(local.expert_map.numel())
        values += [size, size + 7, 2**31 - 1]
    return values


def inject_invalid(gen: torch.Generator, ids: torch.Tensor, is_padding: torch.Tensor, local: LocalExperts,
                   count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``ids`` with ``count`` slots of real rows set to `invalid_values`; returns it and the bool mask."""
    out = ids.clone()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    real_slots = (~is_padding).nonzero().flatten()
    if real_slots.numel() == 0 or count <= 0:
        return out, mask
    values = invalid_values(local)
    k = ids.shape[1]
    flat_positions = (real_slots.view(-1, 1) * k + torch.arange(k)).flatten()
    chosen = flat_positions[torch.randperm(flat_positions.numel(), generator=gen)[:count]]
    picks = torch.randint(0, len(values), (chosen.numel(),), generator=gen)
    out.view(-1)[chosen] = torch.tensor([values[i] for i in picks.tolist()], dtype=ids.dtype)
    mask.view(-1)[chosen] = True
    return out, mask


def expected_local_ids(ids: torch.Tensor, local: LocalExperts) -> tuple[torch.Tensor, int]:
    """The contract's ``local_ids`` of ``ids`` on this rank (safe semantics) and the number of invalid ids.

    With a map: ``map[id]`` for ``0 <= id < len(map)``, else -1 and counted
    invalid. Without one: ``id - first`` inside the local range, else -1; only
    negative ids count as invalid.
    """
    ids64 = ids.to("cpu", torch.int64)
    if local.expert_map is None:
        shifted = ids64 - local.first
        inside = (shifted >= 0) & (shifted < local.count)
        return torch.where(inside, shifted, -1).to(torch.int32), int((ids64 < 0).sum())
    table = local.expert_map.to("cpu").to(torch.int64)
    size = table.numel()
    inside = (ids64 >= 0) & (ids64 < size)
    looked = table[ids64.clamp(0, max(size - 1, 0))]
    return torch.where(inside, looked, -1).to(torch.int32), int((~inside).sum())


def exact_activations(gen: torch.Generator, rows: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, H]`` of ``+-0.5, +-1, +-2``: exact in every activation dtype, and after scaling by
    powers of two and summing a few of them (so combine results can be compared exactly)."""
    sign = torch.randint(0, 2, (rows, hidden_size), generator=gen) * 2 - 1
    power = torch.randint(-1, 2, (rows, hidden_size), generator=gen)
    return (sign * torch.pow(2.0, power)).to(dtype)


def router_weights(gen: torch.Generator, rows: int, top_k: int) -> torch.Tensor:
    """``fp32 [rows, K]`` positive weights summing to 1 per row (as a softmax router gives)."""
    w = torch.rand((rows, top_k), generator=gen, dtype=torch.float32) + 0.05
    return w / w.sum(dim=1, keepdim=True)
