"""CPU tests of the weight layout: exact round trips, fragment semantics, and shape errors."""

from __future__ import annotations

import pytest
import torch

from hostcore.errors import ContractError
from hostcore.quant import QuantizedExperts, dequantize, pack_int4, synthetic_experts, unpack_int4
from moe_plugin_marlin.layout import (INTERLEAVE, LAYOUT_VERSION, MarlinWeights, gate_up_permutation, pack_tiles,
                                      permute_group_scales, prepare_experts, unpack_tiles, unpermute_group_scales,
                                      unprepare_experts)


def _random_experts(e: int, h: int, i: int, group: int | None, dtype: torch.dtype, seed: int) -> QuantizedExperts:
    """Fresh random GPTQ weights: every nibble value, random scales (never zeros)."""
    gen = torch.Generator().manual_seed(seed)

    def one(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.randint(0, 16, (e, k, n), generator=gen)
        g = k if group is None else group
        s = (0.5 + torch.rand((e, k // g, n), generator=gen)) / k**0.5
        return pack_int4(q), s.to(dtype)

    a, b = one(h, 2 * i)
    c, d = one(i, h)
    return QuantizedExperts(a, b, c, d, group)


@pytest.mark.parametrize("group", [128, None], ids=["g128", "per-channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_is_exact(group, dtype):
    w = _random_experts(3, 256, 128, group, dtype, seed=int(torch.randint(0, 2**31, (1,))))
    mw = prepare_experts(w, dtype)
    assert mw.w13.shape == (3, 256 // 16, 4 * 128) and mw.w2.shape == (3, 128 // 16, 2 * 256)
    back = unprepare_experts(mw)
    for name in ("w13_qweight", "w13_scales", "w2_qweight", "w2_scales"):
        assert torch.equal(getattr(back, name), getattr(w, name)), name
    assert back.group_size == group


def test_fp32_scales_are_rounded_once_to_the_activation_dtype():
    w = synthetic_experts([0, 5], 128, 64, 64, seed=3)  # fp32 scales
    back = unprepare_experts(prepare_experts(w, torch.bfloat16))
    assert torch.equal(back.w13_qweight, w.w13_qweight) and torch.equal(back.w2_qweight, w.w2_qweight)
    assert torch.equal(back.w13_scales, w.w13_scales.to(torch.bfloat16))


def test_tile_pack_round_trip_random():
    q = torch.randint(0, 16, (64, 192))
    packed = pack_tiles(q)
    assert packed.shape == (4, 384) and packed.dtype == torch.int32
    assert torch.equal(unpack_tiles(packed), q)


def test_packed_words_hold_mma_fragments():
    """Decode every word as the kernel does and compare with the m16n8k16 B-fragment coordinates (PTX ISA):
    lane l = 4c + t holds (k = 2t, 2t+1, 2t+8, 2t+9; n = c) of each n8 tile."""
    k, n = 32, 128
    q = torch.randint(0, 16, (k, n))
    words = pack_tiles(q).to(torch.int64).reshape(k // 16, n // 64, 32, 4) & 0xFFFFFFFF
    for kt in range(k // 16):
        for nt in range(n // 64):
            for lane in range(32):
                c, t = divmod(lane, 4)
                for j in range(4):
                    w = int(words[kt, nt, lane, j])
                    regs = [((w >> (4 * i)) & 0xF, (w >> (16 + 4 * i)) & 0xF) for i in range(4)]
                    n0 = 64 * nt + 16 * j + c
                    r = 16 * kt
                    expect = [(q[r + 2 * t, n0], q[r + 2 * t + 1, n0]), (q[r + 2 * t + 8, n0], q[r + 2 * t + 9, n0]),
                              (q[r + 2 * t, n0 + 8], q[r + 2 * t + 1, n0 + 8]),
                              (q[r + 2 * t + 8, n0 + 8], q[r + 2 * t + 9, n0 + 8])]
                    assert regs == [(int(a), int(b)) for a, b in expect]
    assert sorted(INTERLEAVE) == list(range(8))


def test_group_scale_permutation():
    s = torch.randn(3, 128)
    p = permute_group_scales(s)
    assert torch.equal(unpermute_group_scales(p), s)
    # lane l of tile nt reads 8 values at 64nt + 8(l//4): (j, h) -> column 64nt + 16j + 8h + l//4
    for nt in range(2):
        for c in range(8):
            chunk = p[1, 64 * nt + 8 * c: 64 * nt + 8 * c + 8]
            for j in range(4):
                for h in range(2):
                    assert chunk[2 * j + h] == s[1, 64 * nt + 16 * j + 8 * h + c]


def test_gate_up_permutation():
    i = 64
    perm = gate_up_permutation(i)
    assert sorted(perm.tolist()) == list(range(2 * i))
    assert perm[:8].tolist() == list(range(8)) and perm[8:16].tolist() == list(range(i, i + 8))
    with pytest.raises(ContractError, match="multiple of 8"):
        gate_up_permutation(12)


def test_prepared_weights_dequantize_like_gptq():
    """Dequantizing the unpacked layout equals dequantizing the GPTQ input (sanity of the whole chain)."""
    w = _random_experts(2, 128, 64, 32, torch.float16, seed=11)
    back = unprepare_experts(prepare_experts(w, torch.float16))
    assert torch.equal(dequantize(back.w2_qweight, back.w2_scales, 32), dequantize(w.w2_qweight, w.w2_scales, 32))
    assert torch.equal(unpack_int4(back.w13_qweight), unpack_int4(w.w13_qweight))


@pytest.mark.parametrize("h,i,group,match", [
    (96, 64, 32, "H % 64 == 0"),
    (128, 48, 16, "I % 64 == 0"),
    (192, 192, 48, "power of two"),
    (128, 64, 8, "power of two"),
    (128, 64, 256, "divides K|multiple of group size"),
])
def test_unsupported_shapes_say_what_to_do(h, i, group, match):
    with pytest.raises(ContractError, match=match):
        w = _random_experts(1, h, i, group, torch.bfloat16, seed=1)
        prepare_experts(w, torch.bfloat16)


def test_non_int32_qweight_is_refused():
    w = _random_experts(1, 128, 64, None, torch.bfloat16, seed=2)
    bad = QuantizedExperts(w.w13_qweight, w.w13_scales, w.w2_qweight, w.w2_scales, None)
    object.__setattr__(bad, "w2_qweight", w.w2_qweight.to(torch.int64))
    with pytest.raises(ContractError, match="int32"):
        prepare_experts(bad, torch.bfloat16)


def test_marlin_weights_check_shape_and_version():
    mw = prepare_experts(_random_experts(2, 128, 64, 64, torch.bfloat16, seed=4), torch.bfloat16)
    with pytest.raises(ContractError, match="must have shape"):
        MarlinWeights(mw.w13[:, :4], mw.w13_scales, mw.w2, mw.w2_scales, 64, 128, 64)
    with pytest.raises(ContractError, match="layout version"):
        MarlinWeights(mw.w13, mw.w13_scales, mw.w2, mw.w2_scales, 64, 128, 64, LAYOUT_VERSION + 1)
