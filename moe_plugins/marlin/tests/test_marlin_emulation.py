"""CPU check of the kernels' index math: the emulator (`kernel_emulator`) against the float64 reference.

The emulator repeats the CUDA code's addressing on byte buffers and the
warp-level instructions from their PTX definitions, so a layout/fragment/
swizzle/epilogue mismatch shows up here, without a GPU. The default run covers
one configuration of each tile family; ``MARLIN_EMULATE_ALL=1`` sweeps all.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from marlin_kernel_emulator import emulate_align, emulate_gemm, emulate_topk_sum
from moe_plugin_marlin.jit import TILE_CONFIGS, TileConfig
from moe_plugin_marlin.layout import prepare_experts

from hostcore.backends.experts_torch import moe_reference
from hostcore.quant import synthetic_experts

H, I, E, TOPK = 256, 256, 4, 2


def _routing(rows: int, gen: torch.Generator) -> torch.Tensor:
    """Local ids with some -1 slots (non-local) and one all -1 row (padding)."""
    ids = torch.stack([torch.randperm(E, generator=gen)[:TOPK] for _ in range(rows)]).to(torch.int32)
    drop = torch.rand(ids.shape, generator=gen) < 0.2
    ids = torch.where(drop, -1, ids)
    ids[-1] = -1
    return ids


def run_emulated(cfg1: TileConfig, cfg2: TileConfig, k_splits: int, group_size: int | None, dtype: torch.dtype,
                 rows: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    bf16 = dtype == torch.bfloat16
    w = synthetic_experts(range(E), H, I, group_size, seed=seed, scale_dtype=dtype)
    mw = prepare_experts(w, dtype)
    hidden = torch.randn(rows, H, generator=gen).to(dtype)
    local = _routing(rows, gen)
    topw = torch.rand(rows, TOPK, generator=gen)
    hidden[-1] = float("nan")  # padding row: stale memory that must never be read
    topw[-1] = float("nan")
    slots = rows * TOPK
    bm = cfg1.bm
    assert cfg2.bm == bm
    cap = slots + min(slots, E) * (bm - 1)
    cap = -(-cap // bm) * bm
    nblocks = cap // bm
    sorted_ids, block_ids, npp = emulate_align(local.numpy(), E, bm, nblocks)
    rng = np.random.default_rng(seed)
    g_log2 = 0 if group_size is None else group_size.bit_length() - 1
    grouped = group_size is not None
    a_bits = hidden.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    inter = np.full(slots * I, 0x7FC0, dtype=np.uint16)  # poison (NaN)
    s13 = mw.w13_scales.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    s2 = mw.w2_scales.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    emulate_gemm(bf16=bf16, m_tiles=cfg1.m_tiles, n_warps=cfg1.n_warps, kw=cfg1.kw, stages=cfg1.stages, grouped=grouped, gemm2=False,
                 a_bits=a_bits, a_row_div=TOPK, K=H, N=2 * I, b_words=mw.w13.numpy().reshape(-1), s_bits=s13,
                 g_log2=g_log2, num_experts=E, sorted_ids=sorted_ids, block_ids=block_ids, npp=npp,
                 num_mblocks=nblocks, num_slots=slots, k_splits=1, topk_weights=None, out=inter,
                 smem_bytes=cfg1.smem_bytes(grouped), rng=rng)
    slot_out = np.full(slots * H, np.nan)
    if k_splits > 1:
        slot_out[:] = 0.0
    emulate_gemm(bf16=bf16, m_tiles=cfg2.m_tiles, n_warps=cfg2.n_warps, kw=cfg2.kw, stages=cfg2.stages, grouped=grouped, gemm2=True,
                 a_bits=inter, a_row_div=1, K=I, N=H, b_words=mw.w2.numpy().reshape(-1), s_bits=s2,
                 g_log2=g_log2, num_experts=E, sorted_ids=sorted_ids, block_ids=block_ids, npp=npp,
                 num_mblocks=nblocks, num_slots=slots, k_splits=k_splits, topk_weights=topw.numpy().reshape(-1),
                 out=slot_out, smem_bytes=cfg2.smem_bytes(grouped), rng=rng)
    out = emulate_topk_sum(slot_out, local.numpy(), TOPK, H, E, bf16)
    ref = moe_reference(hidden, topw, local, w, torch.float64).to(torch.float64).numpy()
    assert np.isfinite(out).all(), "emulated output has NaN: an unwritten or padding value was read"
    assert (out[-1] == 0).all(), "the padding row must be exactly 0"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


QUICK = [
    (TileConfig(1, 2).resolved(), TileConfig(1, 2).resolved(), 1, 128, torch.bfloat16, 9),
    (TileConfig(2, 4).resolved(), TileConfig(2, 4).resolved(), 1, None, torch.float16, 21),
    (TileConfig(1, 1).resolved(), TileConfig(1, 1, stages=3), 2, 32, torch.bfloat16, 5),
]


@pytest.mark.parametrize("cfg1,cfg2,splits,group,dtype,rows", QUICK)
def test_emulated_kernels_match_reference(cfg1, cfg2, splits, group, dtype, rows):
    err = run_emulated(cfg1, cfg2, splits, group, dtype, rows, seed=rows)
    assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.skipif(not os.environ.get("MARLIN_EMULATE_ALL"), reason="set MARLIN_EMULATE_ALL=1 for the full sweep")
@pytest.mark.parametrize("cfg", TILE_CONFIGS, ids=lambda c: f"m{c.m_tiles}n{c.n_warps}")
@pytest.mark.parametrize("group", [16, 64, 128, 256, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_sweep(cfg, group, dtype):
    rows = {1: 7, 2: 19, 4: 40}[cfg.m_tiles]
    err = run_emulated(cfg, cfg, 3 if cfg.n_warps == 1 else 1, group, dtype, rows, seed=cfg.n_warps + rows)
    assert err < 1e-2, f"relative error {err:.2e}"


def _halves(bits32: np.ndarray, bf16: bool) -> np.ndarray:
    """uint32 packed pairs -> float64 [n, 2] (low half first), reading the halves as bf16 / fp16."""
    lo, hi = (bits32 & 0xFFFF).astype(np.uint16), (bits32 >> 16).astype(np.uint16)
    if bf16:
        f = lambda h: (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    else:
        f = lambda h: h.view(np.float16).astype(np.float64)  # noqa: E731
    return np.stack([f(lo), f(hi)], axis=1)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
def test_dequant_constants(bf16):
    """`dequant8` in csrc/marlin_moe.cu, bit by bit: lop3 (a & MASK) | MAGIC read as a packed pair, then
    fma with the kernel's constants, must give nibble - 8 exactly in register i from nibble positions i and
    i + 4 (the order layout.py packs for), for every nibble value at every position."""
    rng = np.random.default_rng(0)
    q = np.concatenate([np.arange(16, dtype=np.uint64) * 0x11111111,
                        rng.integers(0, 2**32, 4096, dtype=np.uint64)]).astype(np.uint32)
    if bf16:  # register i: (q >> 4i) & 0x000F000F | 128.0, then * 1 - 136
        regs = [(((q >> (4 * i)) & 0x000F000F) | 0x43004300, 0x3F80, 0xC308) for i in range(4)]
    else:  # registers 1, 3 take their nibbles at bits 4..7 as 1024 + 16 q: * 1/16 - 72
        h = q >> 8
        regs = [((q & 0x000F000F) | 0x64006400, 0x3C00, 0xE408), ((q & 0x00F000F0) | 0x64006400, 0x2C00, 0xD480),
                ((h & 0x000F000F) | 0x64006400, 0x3C00, 0xE408), ((h & 0x00F000F0) | 0x64006400, 0x2C00, 0xD480)]
    for i, (t, mul, add) in enumerate(regs):
        pair = lambda v: np.full(len(q), v | (v << 16), dtype=np.uint32)  # noqa: E731
        got = _halves(t.astype(np.uint32), bf16) * _halves(pair(mul), bf16) + _halves(pair(add), bf16)
        want = np.stack([((q >> (4 * i)) & 0xF), ((q >> (4 * i + 16)) & 0xF)], axis=1).astype(np.float64) - 8
        assert np.array_equal(got, want), i  # exact in float64, so exact after rounding to bf16 / fp16 too
