"""Output and workspace buffers of the cupy preprocess, sized from a `Plan` (static shapes: preallocate once).

Memory ownership: a `PreprocessBuffers` owns its tensors. `CupyPreprocess.preprocess_into` overwrites
them on every call and returns views of them, valid until the next call with the same buffers. Use
one set of buffers per stream: the grid path's ``done`` counter and workspace are not shared safely
between concurrent launches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hostcore.contract import AlignedLayout, LocalRouting

from .plan import MAP_HEAD, Plan


def map_with_head(table: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Device copy of the expert map behind MAP_HEAD zero words: ``(storage, map view)``.

    The kernels get the view's address. The zero head is what faithful mode reads for ids -64..-1 when
    the map is read from global memory (keep ``storage`` alive as long as the view is used).
    """
    storage = torch.zeros(MAP_HEAD + table.numel(), dtype=torch.int32, device=device)
    storage[MAP_HEAD:] = table.to(device=device, dtype=torch.int32)
    return storage, storage[MAP_HEAD:]


@dataclass(frozen=True)
class PreprocessBuffers:
    """Every tensor one preprocess writes, for one input shape (see `Plan`).

    Outputs: ``local_ids int32[rows, top_k]``, ``expert_counts int32[num_local]``, ``invalid_count int32[1]``,
    and with ``block_m``: ``sorted_slot_ids int32[capacity]``, ``block_expert_ids int32[capacity // block_m]``,
    ``num_slots_post_padded int32[1]``. Workspace (grid path only; empty on the block path):
    ``tile_hist int32[window * tiles]``, ``tile_invalid int32[tiles]``, ``group_start int32[num_local + 1]``,
    ``done int32[1]``, which starts at 0 and is left at 0 by every launch sequence, and ``keys8
    uint8[num_slots]`` (with at most 254 local experts and a layout to build; else empty). With the fused
    grid kernel (``plan.fused``): ``tile_hist int32[num_local * grid_blocks]`` (per-block counts),
    ``tile_invalid int32[grid_blocks]`` and ``done int32[plan.FUSED_SYNC_INTS]``, 8-byte aligned and zero at
    allocation: ``done[0:2]`` is the grid barrier's 64-bit count of block arrivals (it only grows, by
    ``grid_blocks`` per barrier, so it is a multiple of ``grid_blocks`` between launches), and
    ``done[FUSED_SYNC_STRIDE * (1 + q)]`` hands out the tickets of the ``sorted`` tail's queue q (set by the
    kernel itself in every launch); from ``done[FUSED_SYNC_INTS]`` on, ``int32[2, plan.fused_groups, num_local]``:
    the per-group sums of the counts, half ``parity`` for a launch whose first barrier has that parity (the
    launch zeroes the other half for the next one).

    ``launch_cache`` holds the packed launch arguments built for these buffers (see `launch.Sequence`).
    ``slab``: the one int32 allocation that `allocate` carves every buffer from (``None`` for buffers made
    otherwise); the buffers keep it alive.
    """

    plan: Plan
    local_ids: torch.Tensor
    expert_counts: torch.Tensor
    invalid_count: torch.Tensor
    sorted_slot_ids: torch.Tensor
    block_expert_ids: torch.Tensor
    num_slots_post_padded: torch.Tensor
    tile_hist: torch.Tensor
    tile_invalid: torch.Tensor
    group_start: torch.Tensor
    done: torch.Tensor
    keys8: torch.Tensor
    slab: torch.Tensor | None = field(default=None, compare=False, repr=False)
    launch_cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def allocate(cls, plan: Plan, device: torch.device) -> PreprocessBuffers:
        """Allocate (uninitialised except ``done``) buffers for ``plan`` on ``device``.

        Every buffer is a view of ONE int32 allocation (`slab`), each starting 16-byte aligned, ``local_ids``
        at offset 0 and keys8 as a byte view: one allocator call instead of eleven (``preprocess`` allocates
        per call), and every buffer pointer moves by the same amount from one allocation to the next
        (`launch.Sequence.rebase`).
        """
        ws = plan.workspace_ints()
        sizes = (plan.num_slots, plan.num_local, 1, plan.capacity, plan.num_blocks, 1 if plan.block_m else 0,
                 ws["tile_hist"], ws["tile_invalid"], ws["group_start"], ws["done"], -(-ws["keys8_bytes"] // 4))
        # Each buffer's piece, then its padding to a multiple of 4 ints where it needs one; the empty buffers share
        # one empty piece (every view costs host time: 22 pieces took 15 us per call on an H100 host, GPU run 54).
        pieces: list[int] = []
        where: list[int] = []
        empty_at = -1
        for n in sizes:
            if n == 0 and empty_at >= 0:
                where.append(empty_at)
                continue
            empty_at = len(pieces) if n == 0 else empty_at
            where.append(len(pieces))
            pieces.append(n)
            if n % 4:
                pieces.append(-n % 4)
        slab = torch.empty(sum(pieces), dtype=torch.int32, device=device)
        views = slab.split_with_sizes(pieces)
        (local_ids, counts, invalid, sorted_ids, block_ids, total, hist, tile_invalid, group_start, done,
         keys) = (views[i] for i in where)
        if done.numel():
            done.zero_()
        return cls(plan=plan, local_ids=local_ids.view(plan.rows, plan.top_k), expert_counts=counts,
                   invalid_count=invalid, sorted_slot_ids=sorted_ids, block_expert_ids=block_ids,
                   num_slots_post_padded=total, tile_hist=hist, tile_invalid=tile_invalid, group_start=group_start,
                   done=done, keys8=keys.view(torch.uint8)[:ws["keys8_bytes"]], slab=slab)

    def routing(self, count_invalid: bool) -> LocalRouting:
        """The `LocalRouting` view of these buffers (``invalid_count`` only when the mode counts)."""
        aligned = None
        if self.plan.block_m:
            aligned = AlignedLayout(self.sorted_slot_ids, self.block_expert_ids, self.num_slots_post_padded,
                                    self.plan.block_m)
        return LocalRouting(self.local_ids, self.expert_counts, self.invalid_count if count_invalid else None, aligned)
