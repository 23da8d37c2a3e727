"""Python API over the CUDA kernels: tile selection and launches on torch tensors.

Every function here takes torch tensors on one CUDA device, checks nothing
expensive (no device sync, no allocation), and launches on the current torch
stream, so a sequence of calls can be captured in a CUDA graph. Shapes and
dtypes are the caller's contract (`moe_plugin_marlin.stage` validates them once).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from hostcore.contract import aligned_capacity

from .jit import (
    ALIGN_THREADS,
    SK_TILE_CONFIGS,
    THREADS,
    TILE_CONFIGS,
    KernelSet,
    TileConfig,
)

VARIANTS: dict[str, tuple[str, str]] = {
    "base": ("base", "base"),
    "waves": ("waves", "waves"),
    "sk": ("sk", "sk"),
    "sk2": ("waves", "sk"),
}
"""Kernel/plan variants (experiments until a GPU measurement picks a default), as (GEMM1 mode, GEMM2 mode):

* ``base``: the launch-per-tile kernel with the original heuristic (the default);
* ``waves``: the same kernel, tile width (GEMM1) and K splits (GEMM2) chosen to minimise the number of
  CTA waves per unit of work, for the *expected* number of non-empty blocks (distinct experts hit by
  uniform routing) instead of ``min(num_local, slots)``;
* ``sk``: the stream-K kernel (`moe_marlin_gemm_sk`) for both GEMMs at 16/32-row blocks (64-row
  blocks fall back to ``base``); GEMM1 zeroes GEMM2's output, so there is no memset launch;
* ``sk2``: ``waves`` for GEMM1, stream-K for GEMM2.

Selected by ``MOE_MARLIN_VARIANT`` (read when a stage is built) or `MarlinExperts.set_variant`."""

SK_MIN_UNITS = int(os.environ.get("MOE_MARLIN_SK_MIN_UNITS") or 8)
"""Stream-K grid: at least this many expected (tile, k-step) units per CTA, so the pipeline fill (STAGES - 1
units) stays small against the work (the base kernel's smallest grids also give each CTA ~8 steps)."""


def default_variant() -> str:
    """``MOE_MARLIN_VARIANT`` or ``base``; raises ValueError naming the choices for an unknown name."""
    v = os.environ.get("MOE_MARLIN_VARIANT") or "base"
    if v not in VARIANTS:
        raise ValueError(f"MOE_MARLIN_VARIANT={v!r} is not one of {sorted(VARIANTS)}")
    return v


@dataclass(frozen=True)
class GemmPlan:
    """How one GEMM is launched: tile configuration and K splits (GEMM2 only), or stream-K.

    ``streamk``: launch `moe_marlin_gemm_sk` with ``grid`` persistent CTAs (``k_splits`` is then 1: the
    kernel splits K itself wherever a CTA's share of the work ends inside a tile)."""

    cfg: TileConfig
    k_splits: int = 1
    streamk: bool = False
    grid: int = 0


def expected_blocks(num_slots: int, num_local: int, block_m: int) -> float:
    """Expected non-empty ``block_m``-row blocks for ``num_slots`` slots routed uniformly over ``num_local``
    experts: distinct experts ``L (1 - (1 - 1/L)^slots)``, each with ``ceil(rows / block_m)`` blocks
    (about ``rows / block_m + 1/2`` once an expert gets more than one block)."""
    if num_slots <= 0 or num_local <= 0:
        return 0.0
    distinct = num_local * (1.0 - (1.0 - 1.0 / num_local) ** num_slots)
    per = num_slots / distinct
    return distinct * (1.0 if per <= block_m else per / block_m + 0.5)


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _i32(v: int) -> np.int32:
    return np.int32(v)


def choose_block_m(num_slots: int, num_local: int) -> int:
    """Block size of the aligned layout for ``num_slots`` routed slots over ``num_local`` experts.

    Decode-sized batches (<= 16 rows per active expert) use 16 rows; larger
    batches use 32 or 64 so one weight tile serves more rows.
    """
    active = max(1, min(num_local, num_slots))
    rows = num_slots / active
    if rows <= 16:
        return 16
    if rows <= 32:
        return 32
    return 64


def plan_gemm(n_out: int, k: int, num_slots: int, num_local: int, block_m: int, sm_count: int,
              allow_split: bool, override: tuple[int, int] | None = None, mode: str = "base") -> GemmPlan:
    """Pick the tile and K splits for one GEMM from static shapes only (no device sync).

    ``mode="base"``: GEMM1 (``allow_split=False``): the widest tile that still
    fills one wave of 2 CTAs per SM with the expected number of blocks, else the
    narrowest. GEMM2: the widest tile, split along K (fp32 atomics) until about
    4 CTAs per SM are busy, keeping >= 4 pipeline steps per split. Chosen from a
    tile sweep on an H100 (bench/marlin). ``mode="waves"`` / ``"sk"``: see
    `VARIANTS`. ``override = (n_warps, k_splits)`` forces a base-kernel choice.
    """
    m_tiles = block_m // 16
    if mode == "sk" and override is None:
        sk = _plan_streamk(n_out, k, num_slots, num_local, block_m, sm_count)
        if sk is not None:
            return sk
    if mode == "waves" and override is None:
        return _plan_waves(n_out, k, num_slots, num_local, block_m, sm_count, allow_split)
    fits = [c for c in TILE_CONFIGS if c.m_tiles == m_tiles and n_out % c.tn == 0 and k % c.tk == 0]
    if not fits:
        raise ValueError(f"no tile configuration for N={n_out}, K={k}, block_m={block_m}")
    fits.sort(key=lambda c: -c.tn)
    if override is not None:
        n_warps, splits = override
        chosen = [c for c in fits if c.n_warps == n_warps]
        if not chosen:
            raise ValueError(f"tile override n_warps={n_warps} does not fit N={n_out}, K={k}, block_m={block_m}")
        return GemmPlan(chosen[0], max(1, min(splits, k // chosen[0].tk)) if allow_split else 1)
    active = max(1, min(num_local, num_slots))
    blocks = active + num_slots // block_m
    if allow_split:
        c = fits[0]
        ctas = blocks * (n_out // c.tn)
        splits = max(1, min(-(-4 * sm_count // ctas), (k // c.tk) // 4, 8))
        return GemmPlan(c, splits)
    for c in fits:
        if blocks * (n_out // c.tn) >= 2 * sm_count:
            return GemmPlan(c)
    return GemmPlan(fits[-1])


def _fits(n_out: int, k: int, block_m: int, configs: tuple[TileConfig, ...]) -> list[TileConfig]:
    """Configurations of ``block_m`` rows that tile ``n_out x k``, widest first."""
    fits = [c for c in configs if c.bm == block_m and n_out % c.tn == 0 and k % c.tk == 0]
    return sorted(fits, key=lambda c: -c.tn)


def _plan_waves(n_out: int, k: int, num_slots: int, num_local: int, block_m: int, sm_count: int,
                allow_split: bool) -> GemmPlan:
    """``waves`` mode. Model: every resident CTA streams weights at the same rate, so a launch takes
    ``ceil(ctas / resident)`` waves of one CTA's work (``tn * k / splits`` weights); minimise that product
    over tile widths (GEMM1) or K splits of the widest tile (GEMM2, >= 4 pipeline steps per split), for
    `expected_blocks` blocks. Ties go to the wider tile / fewer splits (fewer atomics)."""
    fits = _fits(n_out, k, block_m, TILE_CONFIGS)
    if not fits:
        raise ValueError(f"no tile configuration for N={n_out}, K={k}, block_m={block_m}")
    blocks = max(1.0, expected_blocks(num_slots, num_local, block_m))
    if allow_split:
        c = fits[0]
        resident = sm_count * c.ctas_per_sm
        tiles = blocks * (n_out // c.tn)
        best = min(range(1, max(1, min(8, (k // c.tk) // 4)) + 1),
                   key=lambda s: (math.ceil(tiles * s / resident - 1e-9) / s, s))
        return GemmPlan(c, best)
    resident = sm_count * fits[0].ctas_per_sm
    return GemmPlan(min(fits, key=lambda c: (math.ceil(blocks * (n_out // c.tn) / resident - 1e-9) * c.tn, -c.tn)))


def _plan_streamk(n_out: int, k: int, num_slots: int, num_local: int, block_m: int,
                  sm_count: int) -> GemmPlan | None:
    """``sk`` mode: the widest stream-K tile, one CTA per resident slot, fewer when the expected work gives
    a CTA under `SK_MIN_UNITS` (tile, k-step) units; None when no stream-K tile fits (64-row blocks)."""
    fits = _fits(n_out, k, block_m, SK_TILE_CONFIGS)
    if not fits:
        return None
    c = fits[0]
    units = max(1.0, expected_blocks(num_slots, num_local, block_m)) * (n_out // c.tn) * (k // c.tk)
    grid = max(1, min(sm_count * c.ctas_per_sm, int(units // SK_MIN_UNITS)))
    return GemmPlan(c, 1, streamk=True, grid=grid)


def launch_align(ks: KernelSet, local_ids: torch.Tensor, num_local: int, block_m: int,
                 sorted_slot_ids: torch.Tensor, block_expert_ids: torch.Tensor,
                 num_post_padded: torch.Tensor) -> int:
    """Aligned layout of ``local_ids`` (int32, contiguous) into the given int32 buffers; returns #blocks.

    ``sorted_slot_ids`` needs >= ``aligned_capacity(slots, num_local, block_m)``
    entries and ``block_expert_ids`` capacity / block_m entries.
    """
    slots = local_ids.numel()
    capacity = aligned_capacity(slots, num_local, block_m)
    nblocks = capacity // block_m
    stream = ks.stream(torch.cuda.current_stream(local_ids.device))
    with stream:
        ks.align((1,), (ALIGN_THREADS,),
                 (_ptr(local_ids), _i32(slots), _i32(num_local), _i32(block_m), _i32(nblocks),
                  _ptr(sorted_slot_ids), _ptr(block_expert_ids), _ptr(num_post_padded)),
                 shared_mem=3 * 4 * max(num_local, 1))
    return nblocks


def launch_gemm(ks: KernelSet, plan: GemmPlan, gemm2: bool, a: torch.Tensor, a_row_div: int, k: int, n_out: int,
                weights: torch.Tensor, scales: torch.Tensor, group_size: int | None, num_local: int,
                sorted_slot_ids: torch.Tensor, block_expert_ids: torch.Tensor, num_post_padded: torch.Tensor,
                num_mblocks: int, num_slots: int, topk_weights: torch.Tensor | None, out: torch.Tensor) -> None:
    """One MoE GEMM over every block of the layout (see the kernel's comment in ``csrc/marlin_moe.cu``).

    GEMM1 (``gemm2=False``) writes ``silu(gate) * up`` into ``out [num_slots, n_out/2]``
    (activation dtype); GEMM2 writes router-weighted fp32 rows into ``out
    [num_slots, n_out]`` (which must be zeroed first when ``plan.k_splits > 1``).
    """
    cfg = plan.cfg
    grid = num_mblocks * plan.k_splits * (n_out // cfg.tn)
    if grid == 0:
        return
    g_log2 = 0 if group_size is None else int(group_size).bit_length() - 1
    tw = topk_weights if topk_weights is not None else out
    stream = ks.stream(torch.cuda.current_stream(a.device))
    with stream:
        ks.gemm[(cfg, gemm2)](
            (grid,), (THREADS,),
            (_ptr(a), _i32(a_row_div), _i32(k), _i32(n_out), _ptr(weights), _ptr(scales), _i32(g_log2),
             _i32(num_local), _ptr(sorted_slot_ids), _ptr(block_expert_ids), _ptr(num_post_padded),
             _i32(num_mblocks), _i32(num_slots), _i32(plan.k_splits), _ptr(tw), _ptr(out)),
            shared_mem=cfg.smem_bytes(group_size))


def launch_gemm_sk(ks: KernelSet, plan: GemmPlan, gemm2: bool, a: torch.Tensor, a_row_div: int, k: int,
                   n_out: int, weights: torch.Tensor, scales: torch.Tensor, group_size: int | None,
                   num_local: int, sorted_slot_ids: torch.Tensor, block_expert_ids: torch.Tensor,
                   num_post_padded: torch.Tensor, num_mblocks: int, num_slots: int,
                   topk_weights: torch.Tensor | None, out: torch.Tensor, partial: torch.Tensor | None = None,
                   tile_count: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> None:
    """One MoE GEMM through the stream-K kernel (``plan.streamk``), same outputs as `launch_gemm`.

    GEMM1 also needs ``partial`` (fp32, >= ``num_slots * n_out`` entries) and ``tile_count`` (int32, >=
    ``num_mblocks * n_out / plan.cfg.tn`` entries), both all-zero at the call and left all-zero by it, and
    zeroes ``zero`` (fp32, contiguous, numel % 4 == 0; GEMM2's output when GEMM2 is stream-K or split).
    GEMM2 adds into ``out`` wherever a tile is split between CTAs: ``out`` must be zero beforehand.
    """
    cfg = plan.cfg
    if plan.grid <= 0 or num_mblocks == 0:
        return
    g_log2 = 0 if group_size is None else int(group_size).bit_length() - 1
    tw = topk_weights if topk_weights is not None else out
    if not gemm2:
        assert partial is not None and tile_count is not None, "stream-K GEMM1 needs its workspaces"
        assert partial.numel() >= num_slots * n_out and tile_count.numel() >= num_mblocks * (n_out // cfg.tn)
    part = partial if partial is not None else out
    cnt = tile_count if tile_count is not None else num_post_padded
    zv = 0 if zero is None else zero.numel() // 4
    zp = zero if zero is not None else out
    stream = ks.stream(torch.cuda.current_stream(a.device))
    with stream:
        ks.gemm_sk[(cfg, gemm2)](
            (plan.grid,), (THREADS,),
            (_ptr(a), _i32(a_row_div), _i32(k), _i32(n_out), _ptr(weights), _ptr(scales), _i32(g_log2),
             _i32(num_local), _ptr(sorted_slot_ids), _ptr(block_expert_ids), _ptr(num_post_padded),
             _i32(num_mblocks), _i32(num_slots), _ptr(tw), _ptr(out), _ptr(part), _ptr(cnt), _ptr(zp), _i32(zv)),
            shared_mem=cfg.sk_smem_bytes(group_size))


def launch_topk_sum(ks: KernelSet, slot_out: torch.Tensor, local_ids: torch.Tensor, topk: int, hidden: int,
                    num_local: int, out: torch.Tensor) -> None:
    """``out[n] = sum_k slot_out[n*topk + k]`` over slots with a valid local id; 0 when none."""
    rows = out.shape[0]
    if rows == 0:
        return
    gy = -(-hidden // (4 * THREADS))
    stream = ks.stream(torch.cuda.current_stream(out.device))
    with stream:
        ks.topk_sum((rows, gy), (THREADS,),
                    (_ptr(slot_out), _ptr(local_ids), _i32(topk), _i32(hidden), _i32(num_local), _ptr(out)))
