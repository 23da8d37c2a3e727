"""Weight layout: GPTQ ``uint4b8`` expert weights <-> the tile layout the CUDA kernel streams.

This is our own Marlin-style layout, derived from the ``mma.sync.m16n8k16``
fragment shapes (PTX ISA) so that one 16-byte load per lane feeds four 16x16
B-fragments with no shuffles. Everything here is plain torch and runs on the
CPU or the GPU; `prepare_experts` runs once when the stage is built.

GPTQ input (see `hostcore.quant`)
    ``qweight int32 [E, K/8, N]`` (8 nibbles along K per word, row ``8i+j`` in
    bits ``4j..4j+3``), ``scales [E, K/g, N]`` (g = group size, or ``K`` for
    per-channel scales), ``w = (q - 8) * s``.

Column order (w13 only)
    ``w13`` holds gate (columns ``[0, I)``) and up (``[I, 2I)``). We reorder its
    columns so every 16 consecutive columns are 8 gate columns followed by the 8
    up columns of the same intermediate indices: permuted column ``p`` holds
    source column ``(p // 16) * 8 + p % 8``, plus ``I`` when ``p % 16 >= 8``.
    A thread's mma accumulators then hold gate and up of the same output, so
    ``silu(gate) * up`` is fused into the first GEMM's epilogue. ``w2`` keeps its
    natural column order.

Packed weights ``int32 [E, K/16, 2N]``
    Per expert, the (column-permuted) nibble matrix ``q[K, N]`` is cut into
    16 x 64 tiles, tile ``(kt, nt)`` covering rows ``16kt..16kt+15`` and
    columns ``64nt..64nt+63``. A tile is 32 lanes x 4 words; word ``j`` of lane
    ``l = 4c + t`` (``c = l // 4``, ``t = l % 4``) holds the 8 values that lane
    needs for the two n8 fragments of 16-column sub-tile ``j``: with
    ``n0 = 64nt + 16j + c``, ``n1 = n0 + 8`` and ``r = 16kt``, the logical
    values are ``a = [q[r+2t, n0], q[r+2t+1, n0], q[r+2t+8, n0], q[r+2t+9, n0],
    q[r+2t, n1], q[r+2t+1, n1], q[r+2t+8, n1], q[r+2t+9, n1]]`` and nibble
    position ``p`` (bits ``4p..4p+3``) holds ``a[INTERLEAVE[p]]`` with
    ``INTERLEAVE = [0, 2, 4, 6, 1, 3, 5, 7]``. That order lets the kernel turn
    bits ``(4i, 16+4i)`` into one bf16x2/fp16x2 register (``a[2i], a[2i+1]``)
    with a shift, one ``lop3`` and one ``fma`` (the magic-number trick). Words
    are stored tile after tile, tiles of one ``kt`` row contiguous:
    flat word index ``((kt * N/64 + nt) * 32 + l) * 4 + j``; viewed as
    ``[K/16, 2N]``.

Scales, grouped (``g`` a power of two, ``16 <= g <= K``) ``[E, K/g, N]``
    Each row (one group) is permuted within every 64-column tile so a lane's 8
    scales sit together: position ``64nt + 8c + 2j + h`` holds the scale of
    column ``64nt + 16j + 8h + c`` (of the column-permuted matrix for w13). A
    lane reads 16 bytes at ``64nt + 8(l // 4)``.

Scales, per-channel ``[E, 1, N]``
    Only the w13 column permutation; the kernel scales the fp32 accumulators in
    the epilogue (weights stay exact small integers in the MMA).

Scales are stored in the activation dtype (fp32 input scales are rounded to
it once, here). The inverse functions undo every step exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hostcore.errors import ContractError
from hostcore.quant import PACK, QuantizedExperts

LAYOUT_VERSION = 1
"""Bumped whenever the packed format changes; `MarlinWeights` records the version it was built with."""

TILE_K = 16
TILE_N = 64
INTERLEAVE = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble position p of a packed word holds logical value INTERLEAVE[p] (see the module docstring)."""

_INV_INTERLEAVE = tuple(INTERLEAVE.index(i) for i in range(8))


def gate_up_permutation(intermediate_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``int64 [2I]``: source column of every permuted w13 column (8 gate, 8 up, 8 gate, ...)."""
    if intermediate_size % 8:
        raise ContractError(f"intermediate size I={intermediate_size} must be a multiple of 8 for the gate/up "
                            "interleave of w13; pad the experts' intermediate dimension")
    p = torch.arange(2 * intermediate_size, device=device)
    return (p // 16) * 8 + p % 8 + (p % 16 >= 8).to(torch.int64) * intermediate_size


def _check_tileable(k: int, n: int, what: str) -> None:
    if k % TILE_K or n % TILE_N:
        raise ContractError(f"{what}: K={k} must be a multiple of {TILE_K} and N={n} a multiple of {TILE_N} "
                            f"for the Marlin tile layout (16x64 tiles); got K % 16 = {k % TILE_K}, N % 64 = {n % TILE_N}")


def pack_tiles(q: torch.Tensor) -> torch.Tensor:
    """Nibbles ``q [K, N]`` (any integer dtype, values 0..15) -> packed ``int32 [K/16, 2N]``.

    ``q`` must already be column-permuted (w13). See the module docstring.
    """
    k, n = q.shape
    _check_tileable(k, n, "pack_tiles")
    # rows r = 16kt + 8hi + 2t + lo, columns n = 64nt + 16j + 8h + c
    v = q.to(torch.int32).reshape(k // 16, 2, 4, 2, n // 64, 4, 2, 8)  # kt hi t lo nt j h c
    # -> kt nt c t j | h hi lo  (the last three form the logical index a = 4h + 2hi + lo)
    v = v.permute(0, 4, 7, 2, 5, 6, 1, 3).reshape(k // 16, n // 64, 32, 4, 8)
    v = v[..., list(INTERLEAVE)]  # nibble position p takes logical value INTERLEAVE[p]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    words = (v.to(torch.int64) << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(k // 16, 2 * n)


def unpack_tiles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_tiles`: ``int32 [K/16, 2N]`` -> ``int64 [K, N]`` nibbles."""
    kt, two_n = packed.shape
    n = two_n // 2
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    v = (packed.to(torch.int64).reshape(kt, n // 64, 32, 4, 1) >> shifts) & 0xF  # kt nt lane j p
    v = v[..., list(_INV_INTERLEAVE)]  # back to logical order a
    v = v.reshape(kt, n // 64, 8, 4, 4, 2, 2, 2)  # kt nt c t j h hi lo
    v = v.permute(0, 6, 3, 7, 1, 4, 5, 2)  # kt hi t lo nt j h c
    return v.reshape(kt * 16, n)


def permute_group_scales(s: torch.Tensor) -> torch.Tensor:
    """Grouped scales ``[G, N]`` -> ``[G, N]`` in the per-lane order (module docstring)."""
    g, n = s.shape
    if n % TILE_N:
        raise ContractError(f"scales have N={n} columns, which must be a multiple of {TILE_N}")
    return s.reshape(g, n // 64, 4, 2, 8).permute(0, 1, 4, 2, 3).reshape(g, n)  # G nt c j h


def unpermute_group_scales(s: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute_group_scales`."""
    g, n = s.shape
    return s.reshape(g, n // 64, 8, 4, 2).permute(0, 1, 3, 4, 2).reshape(g, n)  # G nt j h c


@dataclass(frozen=True)
class MarlinWeights:
    """The local experts' weights in the kernel's layout (see the module docstring).

    ``w13 int32 [E, H/16, 4I]``, ``w13_scales [E, G13, 2I]``, ``w2 int32 [E, I/16, 2H]``,
    ``w2_scales [E, G2, H]`` (activation dtype; ``G = K/g``, or 1 per-channel),
    all contiguous on one device. ``group_size`` is ``None`` for per-channel.
    Owns its tensors; the stage keeps it for its lifetime.
    """

    w13: torch.Tensor
    w13_scales: torch.Tensor
    w2: torch.Tensor
    w2_scales: torch.Tensor
    group_size: int | None
    hidden_size: int
    intermediate_size: int
    layout_version: int = LAYOUT_VERSION

    def __post_init__(self) -> None:
        if self.layout_version != LAYOUT_VERSION:
            raise ContractError(f"these weights were packed with Marlin layout version {self.layout_version}, this "
                                f"plugin reads version {LAYOUT_VERSION}: repack them from the GPTQ checkpoint with "
                                "moe_plugin_marlin.prepare_experts")
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        expect = {"w13": (e, h // 16, 4 * i), "w2": (e, i // 16, 2 * h),
                  "w13_scales": (e, _groups(h, self.group_size), 2 * i),
                  "w2_scales": (e, _groups(i, self.group_size), h)}
        for name, shape in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ContractError(f"MarlinWeights.{name} must have shape {shape} for H={h}, I={i}, E={e}, "
                                    f"group_size={self.group_size}; got {tuple(t.shape)}")
        if self.w13.dtype != torch.int32 or self.w2.dtype != torch.int32:
            raise ContractError(f"packed weights must be int32, got {self.w13.dtype} / {self.w2.dtype}")

    @property
    def num_experts(self) -> int:
        return int(self.w13.shape[0])

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.w13_scales.dtype

    @property
    def device(self) -> torch.device:
        return self.w13.device


def _groups(k: int, group_size: int | None) -> int:
    return 1 if group_size is None else k // group_size


def check_group_size(group_size: int | None, k: int, what: str) -> None:
    """Raise unless ``group_size`` is None (per-channel) or a power of two in [16, K] dividing K."""
    if group_size is None:
        return
    if group_size < 16 or group_size & (group_size - 1) or k % group_size:
        raise ContractError(f"{what}: group size {group_size} is not supported for K={k}: it must be a power of two "
                            ">= 16 that divides K (e.g. 32, 64, 128), or None for per-channel scales")


def _pack_one(qweight: torch.Tensor, scales: torch.Tensor, group_size: int | None, col_perm: torch.Tensor | None,
              scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    q = _unpack_gptq(qweight)
    s = scales
    if col_perm is not None:
        q = q[:, col_perm]
        s = s[:, col_perm]
    s = s.to(scale_dtype)
    packed = pack_tiles(q)
    s = s.contiguous() if group_size is None else permute_group_scales(s)
    return packed, s


def _unpack_gptq(qweight: torch.Tensor) -> torch.Tensor:
    """``int32 [K/8, N]`` -> ``int32 [K, N]`` nibbles (int32 keeps memory at 4 B/weight)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device).view(PACK, 1)
    nib = (qweight.unsqueeze(-2) >> shifts) & 0xF  # arithmetic shift, then mask: sign bits never leak
    return nib.reshape(qweight.shape[0] * PACK, qweight.shape[1])


def _pack_gptq(q: torch.Tensor) -> torch.Tensor:
    """``[K, N]`` nibbles -> GPTQ ``int32 [K/8, N]``."""
    k, n = q.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device).view(PACK, 1)
    words = (q.to(torch.int64).reshape(k // PACK, PACK, n) << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def validate_gptq(weights: QuantizedExperts) -> None:
    """Raise `ContractError` unless ``weights`` is GPTQ uint4b8 data this kernel can take (shapes, dtypes, sizes)."""
    h, i = weights.hidden_size, weights.intermediate_size
    for name in ("w13_qweight", "w2_qweight"):
        t = getattr(weights, name)
        if t.dtype != torch.int32:
            raise ContractError(f"{name} must be GPTQ int32 [E, K/8, N] (8 nibbles along K per word), got {t.dtype}")
    for name in ("w13_scales", "w2_scales"):
        t = getattr(weights, name)
        if not t.is_floating_point():
            raise ContractError(f"{name} must be a float tensor (fp32/fp16/bf16), got {t.dtype}")
    if h % 64 or i % 64:
        raise ContractError(f"the marlin backend needs H % 64 == 0 and I % 64 == 0 (16x64 weight tiles, K a multiple "
                            f"of the 64-wide pipeline step); got H={h} (H % 64 = {h % 64}), I={i} (I % 64 = {i % 64}). "
                            "Pad hidden/intermediate sizes or use the torch experts backend")
    check_group_size(weights.group_size, h, "w13")
    check_group_size(weights.group_size, i, "w2")


def prepare_experts(weights: QuantizedExperts, scale_dtype: torch.dtype,
                    device: torch.device | str | None = None) -> MarlinWeights:
    """GPTQ experts -> `MarlinWeights` on ``device`` (default: where the weights are).

    Runs once at build. Works expert by expert on ``device`` (each expert's GPTQ
    tensors are copied there first; peak extra memory ~ 16 bytes per weight of
    one expert), so on a GPU it takes well under a second per large expert.
    """
    validate_gptq(weights)
    h, i, g = weights.hidden_size, weights.intermediate_size, weights.group_size
    dev = torch.device(device) if device is not None else weights.w13_qweight.device
    perm = gate_up_permutation(i, weights.w13_qweight.device)
    e = weights.num_experts
    w13 = torch.empty((e, h // 16, 4 * i), dtype=torch.int32, device=dev)
    w2 = torch.empty((e, i // 16, 2 * h), dtype=torch.int32, device=dev)
    s13 = torch.empty((e, _groups(h, g), 2 * i), dtype=scale_dtype, device=dev)
    s2 = torch.empty((e, _groups(i, g), h), dtype=scale_dtype, device=dev)
    perm = perm.to(dev)
    for x in range(e):  # one expert at a time, on the target device: bounded temporaries, fast on a GPU
        a, b = _pack_one(weights.w13_qweight[x].to(dev), weights.w13_scales[x].to(dev), g, perm, scale_dtype)
        w13[x].copy_(a)
        s13[x].copy_(b)
        a, b = _pack_one(weights.w2_qweight[x].to(dev), weights.w2_scales[x].to(dev), g, None, scale_dtype)
        w2[x].copy_(a)
        s2[x].copy_(b)
    return MarlinWeights(w13, s13, w2, s2, g, h, i)


def unprepare_experts(mw: MarlinWeights) -> QuantizedExperts:
    """Exact inverse of `prepare_experts` (scales come back in ``mw.scale_dtype``)."""
    i, g = mw.intermediate_size, mw.group_size
    inv = torch.argsort(gate_up_permutation(i, mw.device))
    w13q, w13s, w2q, w2s = [], [], [], []
    for x in range(mw.num_experts):
        q = unpack_tiles(mw.w13[x])[:, inv]
        s = mw.w13_scales[x] if g is None else unpermute_group_scales(mw.w13_scales[x])
        w13q.append(_pack_gptq(q))
        w13s.append(s[:, inv])
        w2q.append(_pack_gptq(unpack_tiles(mw.w2[x])))
        w2s.append(mw.w2_scales[x] if g is None else unpermute_group_scales(mw.w2_scales[x]))
    if not w13q:
        raise ContractError("no experts to unpack")
    return QuantizedExperts(torch.stack(w13q), torch.stack(w13s), torch.stack(w2q), torch.stack(w2s), g)
