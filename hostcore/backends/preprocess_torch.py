"""Preprocess backend ``torch``: global top-k ids -> local ids, counts and the aligned layout.

Modes (option ``mode``):

``safe`` (default)
    Ids outside the map (``< 0`` or ``>= len(expert_map)``) become -1 and are
    counted in ``LocalRouting.invalid_count``. Without a map, ids outside the
    local range become -1 and only negative ids are counted (``>= E`` is the
    valid map-less sentinel, other ranks' ids are simply not local); the count is
    an ``int32[1]`` device tensor, read only when the caller asks. No host sync.
``checked``
    Raises `ContractError` naming the offending ids and their ``[row, slot]``
    positions. Syncs with the host: a debugging mode.
``faithful``
    Reproduces an unchecked kernel: ``expert_map[id]`` for every id, so a
    negative id wraps to ``expert_map[len + id]`` exactly as tensor indexing
    (and vLLM's bug) does. Ids past the end raise, since what a kernel reads
    there is undefined. For reproducing the padding bug only.
"""

from __future__ import annotations

import torch

from ..contract import AlignedLayout, LocalRouting, aligned_capacity
from ..errors import ContractError
from ..hookspecs import BuildContext
from ..placement import LocalExperts

MODES = ("safe", "checked", "faithful")


class TorchPreprocess:
    def __init__(self, ctx: BuildContext, mode: str = "safe") -> None:
        self.mode = mode
        self.local: LocalExperts = ctx.local
        self.expert_map = None if ctx.local.expert_map is None else ctx.local.expert_map.to(ctx.device)

    def preprocess(self, topk_ids: torch.Tensor, block_m: int | None = None) -> LocalRouting:
        if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
            raise ContractError(f"preprocess takes topk_ids int32/int64 [N, K], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
        local_ids, invalid = self._lookup(topk_ids)
        num_local = self.local.count
        counts = expert_counts(local_ids, num_local)
        aligned = None if block_m is None else align_blocks(local_ids, counts, block_m)
        return LocalRouting(local_ids, counts, invalid, aligned)

    def _lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.expert_map is None:
            shifted = ids - self.local.first
            local = ((shifted >= 0) & (shifted < self.local.count))
            if self.mode == "checked":
                _raise_on(ids, ids < 0, "negative ids (without an expert map a padding sentinel must be >= E="
                                        f"{self.local.global_num_experts})")
            invalid = ((ids < 0).sum().to(torch.int32).reshape(1) if self.mode == "safe" else None)
            return torch.where(local, shifted, -1).to(torch.int32), invalid
        table = self.expert_map
        size = table.numel()
        in_range = (ids >= 0) & (ids < size)
        if self.mode == "faithful":
            if bool((ids >= size).any()):
                _raise_on(ids, ids >= size, f"ids past the end of the expert map int32[{size}] (undefined for an unchecked kernel)", "faithful")
            return table[ids.long()].to(torch.int32), None
        if self.mode == "checked":
            _raise_on(ids, ~in_range, f"ids outside the expert map int32[{size}]: the padding sentinel must satisfy "
                                      "0 <= s < len(expert_map) and expert_map[s] == -1 (choose sentinel=auto)")
        local = torch.where(in_range, table[ids.clamp(0, size - 1).long()], -1).to(torch.int32)
        invalid = (~in_range).sum().to(torch.int32).reshape(1)
        return local, invalid


def _raise_on(ids: torch.Tensor, bad: torch.Tensor, what: str, mode: str = "checked") -> None:
    if not bool(bad.any()):
        return
    positions = bad.nonzero()
    shown = ", ".join(f"[{r}, {k}]={int(ids[r, k])}" for r, k in positions[:8].tolist())
    more = f" (and {positions.shape[0] - 8} more)" if positions.shape[0] > 8 else ""
    raise ContractError(f"preprocess(mode={mode}): {positions.shape[0]} {what}; at [row, slot]=id: {shown}{more}")


def expert_counts(local_ids: torch.Tensor, num_local: int) -> torch.Tensor:
    """``int32[num_local]`` slots per local expert; -1 slots are not counted. No host sync."""
    bucket = torch.where(local_ids >= 0, local_ids, num_local).reshape(-1).long()
    counts = torch.zeros(num_local + 1, dtype=torch.int32, device=local_ids.device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket, dtype=torch.int32))
    return counts[:num_local]


def align_blocks(local_ids: torch.Tensor, counts: torch.Tensor, block_m: int) -> AlignedLayout:
    """The `AlignedLayout` of ``local_ids`` for ``block_m``, with static capacity. No host sync."""
    num_slots = local_ids.numel()
    num_local = counts.numel()
    capacity = aligned_capacity(num_slots, num_local, block_m)
    device = local_ids.device
    flat = local_ids.reshape(-1).long()
    key = torch.where(flat >= 0, flat, num_local)
    order = torch.sort(key, stable=True).indices
    counts64 = counts.long()
    padded = (counts64 + block_m - 1) // block_m * block_m
    group_start = torch.cumsum(padded, 0) - padded
    sorted_start = torch.cumsum(counts64, 0) - counts64
    sorted_key = key[order]
    valid = sorted_key < num_local
    expert = sorted_key.clamp(max=max(num_local - 1, 0))
    position = torch.arange(num_slots, device=device)
    dest = torch.where(valid, group_start[expert] + position - sorted_start[expert], capacity) if num_local else \
        torch.full_like(position, capacity)
    sorted_slot_ids = torch.full((capacity + 1,), num_slots, dtype=torch.int32, device=device)
    sorted_slot_ids.scatter_(0, dest, order.to(torch.int32))
    total = padded.sum().reshape(1)
    block_start = torch.arange(capacity // block_m, device=device) * block_m
    group_end = torch.cumsum(padded, 0)
    block_expert = torch.searchsorted(group_end, block_start, right=True)
    block_expert_ids = torch.where(block_start < total, block_expert, -1).to(torch.int32)
    return AlignedLayout(sorted_slot_ids[:capacity], block_expert_ids, total.to(torch.int32), block_m)
