"""Python API over the CUDA kernels: tile selection and launches on torch tensors.

Every function here takes torch tensors on one CUDA device, checks nothing
expensive (no device sync, no allocation), and launches on the current torch
stream, so a sequence of calls can be captured in a CUDA graph. Shapes and
dtypes are the caller's contract (`moe_plugin_marlin.stage` validates them once).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from hostcore.contract import aligned_capacity

from .jit import ALIGN_THREADS, RESIDENT_CTAS_PER_SM, THREADS, TILE_CONFIGS, KernelSet, TileConfig


@dataclass(frozen=True)
class GemmPlan:
    """How one GEMM is launched: tile configuration and K splits (GEMM2 only)."""

    cfg: TileConfig
    k_splits: int = 1


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


MIN_SINGLE_WAVE = 0.45
"""A GEMM1 tile width whose CTAs fit in one wave is taken if they fill at least this fraction of it (fewer CTAs
leave SMs idle: Qwen3 M=4's 0.43 of a wave of 256-wide tiles ran 6% slower than 0.86 of 128-wide ones)."""
MIN_LAST_WAVE_FILL = 0.8
"""Past one wave, a GEMM1 tile width is taken if ``waves / ceil(waves)`` reaches this (run 9 tile sweep on an
H100: 1.23, 1.48 and 2.22 waves lost to 2.45, 2.97 and 4.45 waves of half-width tiles by 3-6%)."""


def expected_blocks(num_slots: int, num_local: int, block_m: int) -> float:
    """Expected number of ``block_m`` blocks of the aligned layout when ``num_slots`` slots are routed
    uniformly over ``num_local`` experts: ``num_local * E[ceil(c / block_m)]`` with each expert's share ``c``
    Poisson-distributed, i.e. ``num_local * sum_j P(c > j * block_m)`` (the ``j = 0`` term counts the experts hit).
    """
    n = max(1, num_local)
    if num_slots <= 0:
        return 1.0
    lam = num_slots / n
    if lam > 500:  # exp(-lam) underflows; the share is then about normal and ceil adds half a block on average
        return n * (lam / block_m + 0.5)
    term = cdf = math.exp(-lam)  # P(c = 0), P(c <= 0)
    total = 1.0 - cdf
    for i in range(1, int(lam + 12 * math.sqrt(lam) + block_m) + 1):
        term *= lam / i
        cdf += term
        if i % block_m == 0:
            total += max(0.0, 1.0 - cdf)
    return max(1.0, n * total)


@functools.lru_cache(maxsize=4096)
def plan_gemm(n_out: int, k: int, num_slots: int, num_local: int, block_m: int, sm_count: int,
              allow_split: bool, override: tuple[int, int] | None = None) -> GemmPlan:
    """Pick the tile and K splits for one GEMM from static shapes only (no device sync).

    Both rules count CTAs against one wave, the CTAs the GPU runs at once
    (``RESIDENT_CTAS_PER_SM * sm_count``), for the expected number of blocks
    (`expected_blocks`). GEMM1 (``allow_split=False``): the widest tile whose
    CTAs fill at least `MIN_SINGLE_WAVE` of a single wave, or, past one wave,
    leave the last wave at least `MIN_LAST_WAVE_FILL` full; else the narrowest.
    GEMM2: the widest tile, split along K (fp32 atomics) as many times as the
    split CTAs still fit one wave, or, when one split already overflows a wave,
    the fewest splits whose last wave is `MIN_LAST_WAVE_FILL` full; at most 8
    splits with >= 4 pipeline steps each. Fitted to the run-9 tile sweep on an
    H100 (bench/marlin/NOTES.md).
    ``override = (n_warps, k_splits)`` forces a choice. Cached: every forward asks for the same few plans.
    """
    m_tiles = block_m // 16
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
    wave = RESIDENT_CTAS_PER_SM[m_tiles] * sm_count
    blocks = expected_blocks(num_slots, num_local, block_m)
    if allow_split:
        c = fits[0]
        ctas = blocks * (n_out // c.tn)
        cap = max(1, min((k // c.tk) // 4, 8))
        if ctas <= wave:
            return GemmPlan(c, min(int(wave // ctas), cap))
        filled = (s for s in range(1, cap + 1) if s * ctas / wave / math.ceil(s * ctas / wave) >= MIN_LAST_WAVE_FILL)
        return GemmPlan(c, next(filled, 1))
    for c in fits:
        waves = blocks * (n_out // c.tn) / wave
        if MIN_SINGLE_WAVE <= waves <= 1.0 or (waves > 1.0 and waves / math.ceil(waves) >= MIN_LAST_WAVE_FILL):
            return GemmPlan(c)
    return GemmPlan(fits[-1])


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
            shared_mem=ks.smem[cfg])


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
