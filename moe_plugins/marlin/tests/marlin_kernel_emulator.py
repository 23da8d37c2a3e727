"""A CPU transliteration of ``csrc/marlin_moe.cu`` for checking its index math without a GPU.

Every address computation of the kernels (global -> shared copies, the A
swizzle, stage offsets, the per-lane B/scale reads, the cross-warp reduction
buffer, the epilogues, the align kernel's scan and scatter) is repeated here
line by line on byte buffers, and the warp-level instructions are emulated from
their PTX ISA definitions:

* ``ldmatrix.x4``: lanes 8q..8q+7 give the row addresses of matrix q; lane l
  receives row l//4, elements 2(l%4), 2(l%4)+1 of every matrix.
* ``mma.m16n8k16`` fragments (g = lane//4, t = lane%4): A regs
  {(g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; B regs {(k 2t.., n g),
  (k 2t+8.., n g)}; C/D {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.

Shared memory starts filled with random bytes, so a read of something the
kernel never wrote shows up as garbage in the result. Arithmetic is float64
(dequantized weights are rounded to the activation dtype as in the kernel), so
comparisons against the float64 reference are tight. Slow: tiny shapes only.
"""

from __future__ import annotations

import numpy as np
import torch

THREADS = 256


def _f(bits: np.ndarray, bf16: bool) -> np.ndarray:
    """uint16 bit patterns -> float64 values."""
    bits = np.asarray(bits, dtype=np.uint16)
    if bf16:
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.view(np.float16).astype(np.float64)


def _round(x: np.ndarray, bf16: bool) -> np.ndarray:
    """float64 -> value rounded to bf16/fp16 (as float64)."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float64)).to(torch.float32)
    return t.to(torch.bfloat16 if bf16 else torch.float16).to(torch.float64).numpy()


def _bits(x: np.ndarray, bf16: bool) -> np.ndarray:
    t = torch.from_numpy(np.asarray(x, dtype=np.float64)).to(torch.float32).to(torch.bfloat16 if bf16 else torch.float16)
    return t.view(torch.int16).numpy().view(np.uint16)


class Smem:
    """A CTA's dynamic shared memory as bytes, initialised with garbage."""

    def __init__(self, nbytes: int, rng: np.random.Generator) -> None:
        self.b = rng.integers(0, 256, size=nbytes, dtype=np.uint8)

    def put16(self, addr: int, data: np.ndarray) -> None:
        assert addr % 16 == 0 and addr + 16 <= self.b.size, f"shared store out of bounds: {addr}"
        self.b[addr:addr + 16] = data.view(np.uint8)

    def gather(self, addrs: np.ndarray, n: int) -> np.ndarray:
        """Bytes [len(addrs)][n] read at each address (one per lane)."""
        addrs = np.asarray(addrs)
        assert addrs.min() >= 0 and addrs.max() + n <= self.b.size, "shared load out of bounds"
        return np.ascontiguousarray(self.b[addrs[:, None] + np.arange(n)[None, :]])

    def get(self, addr: int, n: int) -> np.ndarray:
        assert addr >= 0 and addr + n <= self.b.size, f"shared load out of bounds: {addr}+{n} > {self.b.size}"
        return self.b[addr:addr + n]


def emulate_gemm(*, bf16: bool, m_tiles: int, n_warps: int, kw: int, stages: int, grouped: bool, gemm2: bool,
                 a_bits: np.ndarray, a_row_div: int, K: int, N: int, b_words: np.ndarray, s_bits: np.ndarray,
                 g_log2: int, num_experts: int, sorted_ids: np.ndarray, block_ids: np.ndarray, npp: int,
                 num_mblocks: int, num_slots: int, k_splits: int, topk_weights: np.ndarray | None,
                 out: np.ndarray, smem_bytes: int, rng: np.random.Generator) -> None:
    """``moe_marlin_gemm`` on numpy buffers. ``out``: uint16 bits (GEMM1) or float64 (GEMM2), flat."""
    k_warps = 8 // n_warps
    TN, TK, BM = 64 * n_warps, 16 * k_warps * kw, 16 * m_tiles
    A_CHUNKS = TK // 8
    B_STAGE = (TK // 16) * (TN // 2)
    A_STAGE = BM * A_CHUNKS
    s_rows = max(1, TK >> g_log2) if grouped else 0
    S_STAGE = s_rows * (TN // 8)  # V4 copied per stage
    S_AREA = (TK // 16) * (TN // 8)  # V4 reserved per stage: the g = 16 worst case, for every group size
    a_bytes = a_bits.view(np.uint8)
    b_bytes = b_words.view(np.uint8)
    s_u16 = s_bits
    groups = (K >> g_log2) if grouped else 1
    grid = num_mblocks * k_splits * (N // TN)
    lanes = np.arange(32)
    for bid in range(grid):
        mb = bid % num_mblocks
        rest = bid // num_mblocks
        split, nt = rest % k_splits, rest // k_splits
        if mb * BM >= npp:
            continue
        e = int(block_ids[mb])
        if e < 0 or e >= num_experts:
            continue
        slot = sorted_ids[mb * BM: mb * BM + BM]
        ok = (slot >= 0) & (slot < num_slots)
        s_slot = np.where(ok, slot, -1)
        s_arow = np.where(ok, slot // a_row_div, -1)
        sm = Smem(smem_bytes, rng)
        sB, sA, sS = 0, stages * B_STAGE * 16, stages * (B_STAGE + A_STAGE) * 16
        total = K // TK
        per = -(-total // k_splits)
        it0 = split * per
        n_iters = min(total, it0 + per) - it0
        b_base = e * (K * N // 32) + nt * (TN // 2)  # V4 units
        s_base = e * groups * N  # u16 units

        def load_stage(stage: int, it: int) -> None:
            kb = it * TK
            for c in range(B_STAGE):
                r, col = divmod(c, TN // 2)
                src = (b_base + (kb // 16 + r) * (N // 2) + col) * 16
                sm.put16(sB + (stage * B_STAGE + c) * 16, b_bytes[src:src + 16])
            for c in range(A_STAGE):
                r, ch = divmod(c, A_CHUNKS)
                dst = sA + (stage * A_STAGE + r * A_CHUNKS + (ch ^ (r & 7))) * 16
                if s_arow[r] >= 0:
                    src = (int(s_arow[r]) * K + kb + ch * 8) * 2
                    sm.put16(dst, a_bytes[src:src + 16])
                else:
                    sm.put16(dst, np.zeros(16, np.uint8))
            if grouped:
                g0 = kb >> g_log2
                for c in range(S_STAGE):
                    r, col = divmod(c, TN // 8)
                    src = (s_base + (g0 + r) * N + nt * TN + col * 8) * 2
                    sm.put16(sS + (stage * S_AREA + c) * 16, s_u16.view(np.uint8)[src:src + 16])

        acc = np.zeros((8, 32, m_tiles, 8, 4))  # [warp][lane][mt][t][i]

        def compute_stage(stage: int) -> None:
            for warp in range(8):
                wn, wk = warp % n_warps, warp // n_warps
                for i in range(kw):
                    kk = wk * kw + i
                    afr = []
                    for mt in range(m_tiles):
                        r = mt * 16 + (lanes & 15)
                        ch = kk * 2 + (lanes >> 4)
                        addr = sA + (stage * A_STAGE + r * A_CHUNKS + (ch ^ (r & 7))) * 16
                        rows16 = sm.gather(addr, 16).view(np.uint16)  # [32 lanes][8]: the row each lane points at
                        # lane l, reg q: row l//4 of matrix q (given by lane 8q + l//4), elements 2(l%4), 2(l%4)+1
                        src_lane = 8 * _Q[None, :] + (lanes // 4)[:, None]  # [32][4]
                        col = (2 * (lanes % 4))[:, None, None] + _C[None, None, :]  # [32][1][2]
                        afr.append(rows16[src_lane[:, :, None], col])  # [32][4][2]
                    bw = sm.gather(sB + (stage * B_STAGE + kk * (TN // 2) + wn * 32 + lanes) * 16, 16).view(np.uint32)
                    if grouped:
                        row = (kk * 16) >> g_log2
                        sc = sm.gather(sS + (stage * S_AREA + row * (TN // 8) + wn * 8 + (lanes >> 2)) * 16,
                                       16).view(np.uint16)  # [32][8]
                    for j in range(4):
                        q = bw[:, j].astype(np.int64)
                        w = np.zeros((32, 4, 2))
                        for r4 in range(4):
                            w[:, r4, 0] = ((q >> (4 * r4)) & 0xF) - 8
                            w[:, r4, 1] = ((q >> (16 + 4 * r4)) & 0xF) - 8
                        if grouped:
                            s0 = _f(sc[:, 2 * j], bf16)[:, None]
                            s1 = _f(sc[:, 2 * j + 1], bf16)[:, None]
                            w[:, 0] = _round(w[:, 0] * s0, bf16)
                            w[:, 1] = _round(w[:, 1] * s0, bf16)
                            w[:, 2] = _round(w[:, 2] * s1, bf16)
                            w[:, 3] = _round(w[:, 3] * s1, bf16)
                        for mt in range(m_tiles):
                            _mma(acc[warp, :, mt, 2 * j], _f(afr[mt], bf16), w[:, 0], w[:, 1])
                            _mma(acc[warp, :, mt, 2 * j + 1], _f(afr[mt], bf16), w[:, 2], w[:, 3])

        for it in range(n_iters):
            load_stage(it % stages, it0 + it)
            compute_stage(it % stages)

        # cross-warp reduction through shared memory (float32, as in the kernel)
        if k_warps > 1:
            per_warp = m_tiles * 32 * 32
            red = np.zeros(0)
            for warp in range(8):
                wn, wk = warp % n_warps, warp // n_warps
                if wk > 0:
                    base = ((wk - 1) * n_warps + wn) * per_warp
                    for mt in range(m_tiles):
                        for t in range(8):
                            for i in range(4):
                                idx = base + ((mt * 8 + t) * 4 + i) * 32 + lanes
                                addr = idx * 4
                                assert addr.max() + 4 <= smem_bytes, "reduction buffer exceeds shared memory"
                                sm.b[addr[0]:addr[-1] + 4] = acc[warp, :, mt, t, i].astype(np.float32).view(np.uint8)
            del red
            for warp in range(n_warps):  # wk == 0
                for w2 in range(1, k_warps):
                    base = ((w2 - 1) * n_warps + warp) * per_warp
                    for mt in range(m_tiles):
                        for t in range(8):
                            for i in range(4):
                                addr = (base + ((mt * 8 + t) * 4 + i) * 32) * 4
                                acc[warp, :, mt, t, i] += sm.get(addr, 128).view(np.float32)

        cq = 2 * (lanes & 3)
        for wn in range(n_warps):
            nbase = nt * TN + wn * 64
            if not gemm2:
                I = N // 2
                for j in range(4):
                    if grouped:
                        sg = np.ones((32, 2))
                        su = np.ones((32, 2))
                    else:
                        sg = np.stack([_f(s_u16[s_base + nbase + 16 * j + cq + d], bf16) for d in (0, 1)], 1)
                        su = np.stack([_f(s_u16[s_base + nbase + 16 * j + 8 + cq + d], bf16) for d in (0, 1)], 1)
                    icol = nbase // 2 + 8 * j + cq
                    for mt in range(m_tiles):
                        for hf in range(2):
                            rows = mt * 16 + (lanes >> 2) + 8 * hf
                            for l in range(32):
                                sl = s_slot[rows[l]]
                                if sl < 0:
                                    continue
                                g = acc[wn, l, mt, 2 * j, 2 * hf: 2 * hf + 2] * sg[l]
                                u = acc[wn, l, mt, 2 * j + 1, 2 * hf: 2 * hf + 2] * su[l]
                                act = g / (1 + np.exp(-g)) * u
                                out[sl * I + icol[l]: sl * I + icol[l] + 2] = _bits(act, bf16)
            else:
                for t in range(8):
                    col = nbase + 8 * t + cq
                    if grouped:
                        sv = np.ones((32, 2))
                    else:
                        sv = np.stack([_f(s_u16[s_base + col + d], bf16) for d in (0, 1)], 1)
                    for mt in range(m_tiles):
                        for hf in range(2):
                            rows = mt * 16 + (lanes >> 2) + 8 * hf
                            for l in range(32):
                                sl = s_slot[rows[l]]
                                if sl < 0:
                                    continue
                                v = acc[wn, l, mt, t, 2 * hf: 2 * hf + 2] * sv[l] * topk_weights[sl]
                                dst = sl * N + col[l]
                                if k_splits == 1:
                                    out[dst: dst + 2] = v
                                else:
                                    out[dst: dst + 2] += v


_Q = np.arange(4)
_C = np.arange(2)
_L = np.arange(32)
_G, _T = _L // 4, _L % 4
# A fragment: lane l, reg q, element c -> (row, col) of the 16x16 tile
_A_ROW = (_G[:, None, None] + 8 * (_Q[None, :, None] & 1)) + 0 * _C[None, None, :]
_A_COL = 2 * _T[:, None, None] + 8 * (_Q[None, :, None] >> 1) + _C[None, None, :]
# B fragment: lane l, reg q (0/1), element c -> (k, n)
_B_K = 2 * _T[:, None, None] + 8 * np.arange(2)[None, :, None] + _C[None, None, :]
_B_N = _G[:, None, None] + 0 * _B_K
# C/D fragment: lane l, reg i -> (row, col)
_D_ROW = _G[:, None] + 8 * (_Q[None, :] >> 1)
_D_COL = 2 * _T[:, None] + (_Q[None, :] & 1)


def _mma(d: np.ndarray, a: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> None:
    """d[32][4] += A(16x16) @ B(16x8) from per-lane fragments a[32][4][2], b0/b1[32][2] (PTX ISA layouts)."""
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    A[_A_ROW, _A_COL] = a
    B[_B_K, _B_N] = np.stack([b0, b1], axis=1)
    assert not np.isnan(A).any() and not np.isnan(B).any(), "fragments do not cover the tile"
    D = A @ B
    d += D[_D_ROW, _D_COL]


def emulate_align(local_ids: np.ndarray, num_experts: int, block_m: int, num_mblocks: int,
                  nthr: int = 1024) -> tuple[np.ndarray, np.ndarray, int]:
    """``moe_marlin_align`` (the scan done per thread exactly as in the kernel; atomics in slot order)."""
    num_slots = local_ids.size
    sorted_ids = np.full(num_mblocks * block_m, num_slots, dtype=np.int64)
    cnt = np.zeros(num_experts, np.int64)
    for e in local_ids.reshape(-1):
        if 0 <= e < num_experts:
            cnt[e] += 1
    pad = (cnt + block_m - 1) // block_m * block_m
    per = -(-num_experts // nthr)
    mine = np.array([pad[t * per: t * per + per].sum() for t in range(nthr)])
    incl = np.cumsum(mine)
    end = np.zeros(num_experts, np.int64)
    for t in range(nthr):
        run = incl[t] - mine[t]
        for i in range(per):
            e = t * per + i
            if e < num_experts:
                run += pad[e]
                end[e] = run
    total = int(incl[-1])
    block_ids = np.full(num_mblocks, -1, np.int64)
    for b in range(num_mblocks):
        start = b * block_m
        if start < total:
            lo, hi = 0, num_experts - 1
            while lo < hi:
                mid = (lo + hi) >> 1
                if end[mid] > start:
                    hi = mid
                else:
                    lo = mid + 1
            block_ids[b] = lo
    fill = np.zeros(num_experts, np.int64)
    for i, e in enumerate(local_ids.reshape(-1)):
        if 0 <= e < num_experts:
            sorted_ids[end[e] - pad[e] + fill[e]] = i
            fill[e] += 1
    return sorted_ids, block_ids, total


def emulate_topk_sum(slot_out: np.ndarray, local_ids: np.ndarray, topk: int, H: int, num_experts: int,
                     bf16: bool) -> np.ndarray:
    rows = local_ids.shape[0]
    out = np.zeros((rows, H))
    so = slot_out.reshape(-1, H)
    for n in range(rows):
        for k in range(topk):
            e = local_ids[n, k]
            if 0 <= e < num_experts:
                out[n] += so[n * topk + k].astype(np.float32)
    return _round(out, bf16)
