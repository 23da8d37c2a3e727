"""GPTQ symmetric int4 (``uint4b8``) expert weights: packing, unpacking and synthetic weights.

Format (GPTQ, symmetric, no zero points): a weight ``w[k, n]`` of a ``K x N``
matrix (``K`` = input features) is stored as a nibble ``q in [0, 16)`` with
``w = (q - 8) * scales[k // g, n]``. ``qweight int32 [K/8, N]`` packs 8
consecutive rows per word, row ``8i + j`` in bits ``4j..4j+3``. ``g`` is the
group size (128 typically) or ``K`` for per-channel scales (``group_size=None``).

An MoE layer has per expert ``w13`` (gate and up stacked along N: ``K = H``,
``N = 2I``, gate = columns ``[0, I)``) and ``w2`` (``K = I``, ``N = H``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ContractError

PACK = 8  # nibbles per int32 word
ZERO_POINT = 8  # uint4b8: stored value 8 means weight 0


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``q [..., K, N]`` integers in ``[0, 16)`` -> ``int32 [..., K/8, N]`` (GPTQ packing along K)."""
    if q.shape[-2] % PACK:
        raise ContractError(f"K={q.shape[-2]} must be a multiple of {PACK} to pack int4 along K")
    q = q.to(torch.int64)
    if bool(((q < 0) | (q > 15)).any()):
        raise ContractError("int4 values must lie in [0, 16)")
    words = q.reshape(*q.shape[:-2], q.shape[-2] // PACK, PACK, q.shape[-1])
    shifts = (torch.arange(PACK, dtype=torch.int64) * 4).view(PACK, 1)
    packed = (words << shifts).sum(dim=-2)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """``int32 [..., K/8, N]`` -> ``int64 [..., K, N]`` nibbles in ``[0, 16)``; inverse of `pack_int4`."""
    if qweight.dtype != torch.int32:
        raise ContractError(f"qweight must be int32 (8 nibbles along K per word), got {qweight.dtype}")
    shifts = (torch.arange(PACK, dtype=torch.int64, device=qweight.device) * 4).view(PACK, 1)
    nibbles = (qweight.to(torch.int64).unsqueeze(-2) >> shifts) & 0xF
    return nibbles.reshape(*qweight.shape[:-2], qweight.shape[-2] * PACK, qweight.shape[-1])


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[..., K/8, N]`` int32 + ``[..., K/g, N]`` scales -> fp32 ``[..., K, N]`` weights."""
    q = unpack_int4(qweight)
    k = q.shape[-2]
    g = k if group_size is None else group_size
    if scales.shape[-2] * g != k:
        raise ContractError(f"scales have {scales.shape[-2]} groups along K={k}, expected {k // g} for group size {g}")
    s = scales.to(torch.float32).repeat_interleave(g, dim=-2)
    return (q - ZERO_POINT).to(torch.float32) * s


@dataclass(frozen=True)
class QuantizedExperts:
    """GPTQ int4 weights of a set of experts (all experts, or one rank's local ones).

    ``w13_qweight int32 [E, H/8, 2I]``, ``w13_scales [E, H/g, 2I]``,
    ``w2_qweight int32 [E, I/8, H]``, ``w2_scales [E, I/g, H]`` (scales in a float
    dtype, usually the activation dtype), ``group_size`` g or ``None`` for
    per-channel. Index ``e`` is the local expert id.
    """

    w13_qweight: torch.Tensor
    w13_scales: torch.Tensor
    w2_qweight: torch.Tensor
    w2_scales: torch.Tensor
    group_size: int | None

    def __post_init__(self) -> None:
        e, h8, two_i = self.w13_qweight.shape
        i = two_i // 2
        h = h8 * PACK
        if self.w2_qweight.shape != (e, i // PACK, h) or two_i % 2:
            raise ContractError(f"w2_qweight must be [E, I/8, H] = [{e}, {i // PACK}, {h}] to match w13_qweight "
                                f"{tuple(self.w13_qweight.shape)}, got {tuple(self.w2_qweight.shape)}")
        for name, k in (("w13", h), ("w2", i)):
            g = k if self.group_size is None else self.group_size
            if k % g:
                raise ContractError(f"{name}: K={k} is not a multiple of group size {g}")
            scales = getattr(self, f"{name}_scales")
            n = two_i if name == "w13" else h
            if tuple(scales.shape) != (e, k // g, n):
                raise ContractError(f"{name}_scales must be [E, K/g, N] = [{e}, {k // g}, {n}], got {tuple(scales.shape)}")

    @property
    def num_experts(self) -> int:
        return int(self.w13_qweight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.w13_qweight.shape[1]) * PACK

    @property
    def intermediate_size(self) -> int:
        return int(self.w13_qweight.shape[2]) // 2

    def select(self, experts: Sequence[int]) -> QuantizedExperts:
        """The weights of ``experts`` (global ids in local-id order)."""
        idx = torch.tensor(list(experts), dtype=torch.long, device=self.w13_qweight.device)
        return QuantizedExperts(self.w13_qweight[idx], self.w13_scales[idx], self.w2_qweight[idx],
                                self.w2_scales[idx], self.group_size)

    def to(self, device: torch.device | str) -> QuantizedExperts:
        return QuantizedExperts(self.w13_qweight.to(device), self.w13_scales.to(device), self.w2_qweight.to(device),
                                self.w2_scales.to(device), self.group_size)

    def dequantized(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``w13 [H, 2I]`` and ``w2 [I, H]`` of expert ``e``."""
        return (dequantize(self.w13_qweight[e], self.w13_scales[e], self.group_size),
                dequantize(self.w2_qweight[e], self.w2_scales[e], self.group_size))


def _random_matrix(gen: torch.Generator, k: int, n: int, group_size: int | None,
                   scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # A uniformly random 32-bit word is 8 independent uniform nibbles: draw the packed words directly.
    qweight = torch.randint(-(2**31), 2**31, (k // PACK, n), generator=gen, dtype=torch.int32)
    g = k if group_size is None else group_size
    # |q - 8| has RMS ~4.6; this keeps w ~ 1/sqrt(K) so activations neither vanish nor blow up.
    base = 1.0 / (4.6 * k**0.5)
    scales = base * (0.5 + torch.rand((k // g, n), generator=gen))
    return qweight, scales.to(scale_dtype)


def synthetic_experts(experts: Sequence[int], hidden_size: int, intermediate_size: int, group_size: int | None,
                      seed: int, scale_dtype: torch.dtype = torch.float32) -> QuantizedExperts:
    """Random int4 weights for the given global experts, reproducible per ``(seed, expert)``.

    Each rank can draw just its local experts and get exactly the tensors a
    single-process dense reference draws for the same ids.
    """
    w13q, w13s, w2q, w2s = [], [], [], []
    for e in experts:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(e))
        a, b = _random_matrix(gen, hidden_size, 2 * intermediate_size, group_size, scale_dtype)
        c, d = _random_matrix(gen, intermediate_size, hidden_size, group_size, scale_dtype)
        w13q.append(a)
        w13s.append(b)
        w2q.append(c)
        w2s.append(d)
    if not w13q:
        h8, i8 = hidden_size // PACK, intermediate_size // PACK
        g13 = 1 if group_size is None else hidden_size // group_size
        g2 = 1 if group_size is None else intermediate_size // group_size
        return QuantizedExperts(torch.empty(0, h8, 2 * intermediate_size, dtype=torch.int32),
                                torch.empty(0, g13, 2 * intermediate_size, dtype=scale_dtype),
                                torch.empty(0, i8, hidden_size, dtype=torch.int32),
                                torch.empty(0, g2, hidden_size, dtype=scale_dtype), group_size)
    return QuantizedExperts(torch.stack(w13q), torch.stack(w13s), torch.stack(w2q), torch.stack(w2s), group_size)
