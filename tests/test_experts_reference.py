"""experts=torch, the W4A16 reference, against a token-by-token float64 evaluation of its definition."""

from __future__ import annotations

import pytest
import torch
from helpers import context

from hostcore.backends.experts_torch import TorchExperts, moe_reference
from hostcore.contract import LocalRouting
from hostcore.errors import ContractError
from hostcore.placement import ExpertPlacement
from hostcore.quant import synthetic_experts


def by_definition(x: torch.Tensor, w: torch.Tensor, local_ids: torch.Tensor, weights) -> torch.Tensor:
    inter = weights.intermediate_size
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for k in range(local_ids.shape[1]):
            e = int(local_ids[n, k])
            if e < 0:
                continue
            w13, w2 = (m.double() for m in weights.dequantized(e))
            h = x[n].double() @ w13
            out[n] += float(w[n, k]) * ((torch.nn.functional.silu(h[:inter]) * h[inter:]) @ w2)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [128, None])
def test_matches_the_definition(dtype: torch.dtype, group_size: int | None) -> None:
    gen = torch.Generator().manual_seed(hash((str(dtype), group_size)) % 2**31)
    weights = synthetic_experts([5, 1, 7], 256, 128, group_size, seed=3)
    x = torch.randn(9, 256, generator=gen).to(dtype)
    local_ids = torch.randint(-1, 3, (9, 3), generator=gen, dtype=torch.int32)
    local_ids[4] = -1  # a row with no local slot: exactly zero
    w = torch.rand(9, 3, generator=gen)
    out = moe_reference(x, w, local_ids, weights)
    assert out.dtype == dtype
    ref = by_definition(x, w, local_ids, weights)
    rel = float((out.double() - ref).norm() / ref.norm())
    assert rel < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert bool((out[4] == 0).all())


def test_backend_wraps_the_reference_and_checks_weights() -> None:
    placement = ExpertPlacement.contiguous(4, 2)
    weights = synthetic_experts([2, 3], 256, 128, 128, seed=0)
    experts = TorchExperts(context(placement, rank=1, weights=weights), compute_dtype="float64")
    x = torch.randn(3, 256)
    ids = torch.tensor([[0, 1], [-1, 1], [-1, -1]], dtype=torch.int32)
    w = torch.rand(3, 2)
    out = experts.compute(x, w, LocalRouting(ids, torch.tensor([1, 2], dtype=torch.int32)))
    assert torch.allclose(out.double(), by_definition(x, w, ids, weights), rtol=1e-6, atol=1e-9)
    with pytest.raises(ContractError, match="weights for 1 experts but this rank has 2"):
        TorchExperts(context(placement, rank=1, weights=weights.select([0])))
    with pytest.raises(ContractError, match="H=128 but the expert weights were made for H=256"):
        experts.compute(torch.randn(3, 128), w, LocalRouting(ids, torch.zeros(2, dtype=torch.int32)))
