"""GPTQ int4 packing and the synthetic expert weights."""

from __future__ import annotations

import pytest
import torch

from hostcore.errors import ContractError
from hostcore.quant import QuantizedExperts, dequantize, pack_int4, synthetic_experts, unpack_int4


def test_pack_unpack_round_trip_on_random_nibbles() -> None:
    q = torch.randint(0, 16, (3, 64, 24))
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (3, 8, 24)
    assert torch.equal(unpack_int4(packed), q)


def test_packing_puts_row_8i_plus_j_in_bits_4j() -> None:
    q = torch.zeros(8, 1, dtype=torch.int64)
    q[3, 0] = 0xA
    q[7, 0] = 0xF
    assert pack_int4(q).item() == (0xA << 12) | (0xF << 28) - 2**32


def test_dequantize_is_q_minus_8_times_group_scale() -> None:
    q = torch.randint(0, 16, (256, 4))
    scales = torch.rand(2, 4) + 0.5
    w = dequantize(pack_int4(q), scales, 128)
    expected = (q - 8).float() * scales.repeat_interleave(128, dim=0)
    assert torch.equal(w, expected)
    per_channel = dequantize(pack_int4(q), scales[:1], None)
    assert torch.equal(per_channel, (q - 8).float() * scales[:1])


def test_synthetic_experts_are_reproducible_per_expert() -> None:
    all_four = synthetic_experts([0, 1, 2, 3], 256, 128, 128, seed=5)
    two = synthetic_experts([3, 1], 256, 128, 128, seed=5)
    assert torch.equal(two.w13_qweight[0], all_four.w13_qweight[3])
    assert torch.equal(two.w2_scales[1], all_four.w2_scales[1])
    w13, w2 = all_four.dequantized(0)
    assert w13.shape == (256, 256) and w2.shape == (128, 256)
    assert 0.5 < float(w13.std() * 256**0.5) < 2.0, "weights scaled ~1/sqrt(K)"


def test_shape_checks() -> None:
    good = synthetic_experts([0], 256, 128, 128, seed=0)
    with pytest.raises(ContractError, match="w2_qweight must be"):
        QuantizedExperts(good.w13_qweight, good.w13_scales, good.w2_qweight[:, :-1], good.w2_scales, 128)
    with pytest.raises(ContractError, match="w13_scales must be"):
        QuantizedExperts(good.w13_qweight, good.w13_scales[:, :1], good.w2_qweight, good.w2_scales, 128)
    with pytest.raises(ContractError, match="multiple of group size 96"):
        QuantizedExperts(good.w13_qweight, good.w13_scales, good.w2_qweight, good.w2_scales, 96)
    with pytest.raises(ContractError, match="int32"):
        unpack_int4(good.w13_qweight.to(torch.int64))
