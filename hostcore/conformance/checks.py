"""Reusable checks of stage outputs against the data contract (raise `AssertionError` with what differs).

They read tensors on the host (they sync): for tests, never the hot path. They
raise plain `AssertionError` (not ``assert``) so they work under ``python -O``
and without pytest's assertion rewriting.
"""

from __future__ import annotations

import torch

from ..contract import LocalRouting, aligned_capacity


def expect(condition: bool, message: str) -> None:
    """Raise `AssertionError(message)` unless ``condition``."""
    if not condition:
        raise AssertionError(message)


def _show(values: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return f"[{shown}{', ...' if len(values) > limit else ''}] ({len(values)})"


def check_expert_counts(routing: LocalRouting) -> torch.Tensor:
    """``expert_counts`` is int32 and equals the slots per local expert in ``local_ids``; returns the counts (CPU).

    Also checks ``local_ids`` is int32 ``[N, K]`` with values -1 or a local id
    below ``len(expert_counts)``.
    """
    ids, counts = routing.local_ids, routing.expert_counts
    expect(ids.dtype == torch.int32 and ids.dim() == 2, f"local_ids must be int32 [N, K], got {ids.dtype} {tuple(ids.shape)}")
    expect(counts.dtype == torch.int32 and counts.dim() == 1,
           f"expert_counts must be int32 [num_local_experts], got {counts.dtype} {tuple(counts.shape)}")
    num_local = counts.numel()
    host = ids.detach().to("cpu")
    bad = host[(host < -1) | (host >= num_local)]
    expect(bad.numel() == 0, f"local_ids must be -1 or a local id in [0, {num_local}), found {sorted(set(bad.tolist()))[:8]}")
    expected = torch.bincount(host[host >= 0].long(), minlength=num_local).to(torch.int32)
    got = counts.detach().to("cpu")
    expect(torch.equal(got, expected), f"expert_counts {got.tolist()} != slots per local expert in local_ids {expected.tolist()}")
    return expected


def check_aligned_layout(routing: LocalRouting, block_m: int) -> None:
    """Raise `AssertionError` unless ``routing.aligned`` is the valid `AlignedLayout` of ``routing`` for ``block_m``.

    Valid means (``N * K`` slots, ``L`` local experts, ``c_e`` slots of expert ``e``):

    - ``block_m`` matches; the three tensors are int32, 1-D, on the device of ``local_ids``;
    - ``capacity = len(sorted_slot_ids)`` is a multiple of ``block_m``, at least
      `aligned_capacity` (a static bound must cover the worst case), and
      ``len(block_expert_ids) == capacity // block_m``;
    - ``num_slots_post_padded`` (one element) is ``sum_e ceil(c_e / block_m) * block_m``;
    - the used prefix is the groups of experts ``0..L-1`` in increasing order, empty
      experts taking no space; group ``e`` holds exactly the flat slot indices
      ``n * K + k`` with ``local_ids[n, k] == e`` (each once, any order), then
      padding entries equal to ``N * K`` up to its padded size;
    - ``block_expert_ids`` names the expert of each used block, and is -1 past them.

    Also checks ``expert_counts`` (`check_expert_counts`).
    """
    layout = routing.aligned
    expect(layout is not None, f"preprocess was asked for block_m={block_m} but returned no aligned layout (aligned=None)")
    assert layout is not None
    expect(layout.block_m == block_m, f"aligned.block_m is {layout.block_m}, expected the requested {block_m}")
    device = routing.local_ids.device
    for name in ("sorted_slot_ids", "block_expert_ids", "num_slots_post_padded"):
        t = getattr(layout, name)
        expect(t.dtype == torch.int32 and t.dim() == 1 and t.device == device,
               f"aligned.{name} must be a 1-D int32 tensor on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    counts = check_expert_counts(routing).long()
    n, k = routing.local_ids.shape
    num_slots, num_local = n * k, counts.numel()
    sorted_ids = layout.sorted_slot_ids.detach().to("cpu").long()
    blocks = layout.block_expert_ids.detach().to("cpu").long()
    capacity = sorted_ids.numel()
    need = aligned_capacity(num_slots, num_local, block_m)
    expect(capacity % block_m == 0, f"len(sorted_slot_ids) = {capacity} is not a multiple of block_m={block_m}")
    expect(capacity >= need, f"len(sorted_slot_ids) = {capacity} is below the static bound aligned_capacity = {need}: "
                             "a worst-case routing would not fit")
    expect(blocks.numel() == capacity // block_m,
           f"len(block_expert_ids) = {blocks.numel()}, expected capacity // block_m = {capacity // block_m}")
    expect(layout.num_slots_post_padded.numel() == 1,
           f"num_slots_post_padded must have one element, got {layout.num_slots_post_padded.numel()}")
    padded = (counts + block_m - 1) // block_m * block_m
    total = int(padded.sum())
    got_total = int(layout.num_slots_post_padded.detach().to("cpu")[0])
    expect(got_total == total, f"num_slots_post_padded = {got_total}, expected {total} "
                               f"(expert counts {counts.tolist()} each padded to a multiple of {block_m})")
    flat = routing.local_ids.detach().to("cpu").reshape(-1)
    start = 0
    for e in range(num_local):
        c, p = int(counts[e]), int(padded[e])
        group = sorted_ids[start: start + p]
        real = sorted(group[:c].tolist())
        wanted = (flat == e).nonzero().flatten().tolist()
        expect(real == wanted, f"group of local expert {e} at sorted_slot_ids[{start}:{start + c}] holds slots "
                               f"{_show(real)}, expected the slots routed to it {_show(wanted)}")
        tail = group[c:].tolist()
        expect(all(v == num_slots for v in tail), f"group of local expert {e} must be padded with N*K={num_slots} "
                                                  f"at sorted_slot_ids[{start + c}:{start + p}], got {_show(tail)}")
        owners = blocks[start // block_m: (start + p) // block_m].tolist()
        expect(all(b == e for b in owners), f"block_expert_ids[{start // block_m}:{(start + p) // block_m}] = {owners}, "
                                            f"expected {e} (blocks of local expert {e})")
        start += p
    rest = blocks[total // block_m:].tolist()
    expect(all(b == -1 for b in rest), f"block_expert_ids past the used blocks (from {total // block_m}) must be -1, "
                                       f"got {_show(rest)}")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||_F / ||ref||_F`` in float64 (0 when both are 0; inf when only ``ref`` is 0)."""
    diff = torch.linalg.vector_norm(out.detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64))
    scale = torch.linalg.vector_norm(ref.detach().to("cpu", torch.float64))
    if float(scale) == 0.0:
        return 0.0 if float(diff) == 0.0 else float("inf")
    return float(diff / scale)
