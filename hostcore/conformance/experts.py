"""`ExpertsContract`: the contract tests of an expert-compute backend (stage ``experts``).

For each activation dtype in ``dtypes`` and each ``(H, I, group_size)`` in
``shapes`` (group size 128 or ``None`` = per-channel), a case draws 4-8 local
experts of a 2-rank placement (contiguous or round-robin), top-k 2-4, and a
received batch: uneven rows per source with padding rows (sentinel ids, their
hidden states and weights NaN, as stale memory may be), and real rows whose
slots are partly non-local (local id -1), some rows entirely so. The weights
are `hostcore.quant.synthetic_experts` for the local experts; the routing comes
from the host ``torch`` preprocess (safe), with the backend's ``block_m`` when
it has one. The backend must:

- return ``[N, H]`` in the activation dtype on the device, equal to
  `hostcore.backends.experts_torch.moe_reference` computed in float64 within
  ``rtol`` (relative Frobenius norm over all rows);
- give exactly 0 in every row with no local slot (padding included: NaN
  hidden must never be read), finite values elsewhere;
- when ``compute`` accepts ``out=``, write into that (NaN-poisoned) tensor;
- leave its inputs untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..backends.experts_torch import moe_reference
from ..contract import LocalRouting, Stage
from ..hookspecs import BuildContext
from ..placement import ExpertPlacement
from ..quant import QuantizedExperts, synthetic_experts
from .base import ContractBase
from .checks import expect, relative_error
from .data import padding_mask, received_ids, router_weights
from .layouts import PaddingSentinel, auto_sentinel

DEFAULT_RTOL: Mapping[torch.dtype, float] = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-5}
"""Relative Frobenius tolerance per activation dtype (the output is rounded to it once or a few times)."""


@dataclass
class ExpertsCase:
    """One generated input (CPU tensors) and what the backend is built with."""

    ctx: BuildContext
    padding: PaddingSentinel
    rows_per_source: tuple[int, ...]
    rows_per_rank: int
    ids: torch.Tensor
    hidden: torch.Tensor
    topk_weights: torch.Tensor
    weights: QuantizedExperts

    def __str__(self) -> str:
        w = self.weights
        return (f"E_local={w.num_experts} H={w.hidden_size} I={w.intermediate_size} group={w.group_size} "
                f"K={self.ids.shape[1]} dtype={self.hidden.dtype} rows per source {list(self.rows_per_source)} of "
                f"R={self.rows_per_rank}, rank {self.ctx.rank} of {self.ctx.placement.owner}, "
                f"sentinel {self.padding.sentinel}")


class ExpertsContract(ContractBase):
    """Subclass with ``backend = "<name>"`` (``options``, ``device``, ``dtypes``, ``rtol``, ``shapes``)."""

    stage: ClassVar[Stage] = Stage.EXPERTS
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float16, torch.float32)
    rtol: ClassVar[float | Mapping[torch.dtype, float] | None] = None
    shapes: ClassVar[tuple[tuple[int, int, int | None], ...]] = ((256, 128, 128), (256, 256, None), (256, 256, 128))
    cases: ClassVar[int] = 2

    def tolerance(self, dtype: torch.dtype) -> float:
        if self.rtol is None:
            return DEFAULT_RTOL[dtype]
        if isinstance(self.rtol, Mapping):
            return self.rtol.get(dtype, DEFAULT_RTOL[dtype])
        return float(self.rtol)

    def make_case(self, dtype: torch.dtype, shape: tuple[int, int, int | None], index: int) -> ExpertsCase:
        hidden_size, inter, group = shape
        rng = self.rng("case", dtype, shape, index)
        gen = self.torch_gen(rng)
        num_local = rng.randint(4, 8)
        top_k = rng.randint(2, 4)
        maker = rng.choice([ExpertPlacement.contiguous, ExpertPlacement.round_robin])
        placement = maker(2 * num_local, 2)
        rank = rng.randrange(2)
        padding = auto_sentinel(placement.local_experts(rank, use_map=True))
        weights = synthetic_experts(padding.local.global_ids(), hidden_size, inter, group, seed=rng.getrandbits(20),
                                    scale_dtype=dtype)
        r = rng.randint(4, 24)
        rows = (rng.randint(0, r - 1), rng.randint(1, r - 1))
        ids = received_ids(gen, rows, r, top_k, placement.global_num_experts, padding.sentinel)
        # One real row routed only to other ranks' experts: its output must be exactly 0 too.
        remote = [e for e, owner in enumerate(placement.owner) if owner != rank]
        ids[r] = torch.tensor([remote[j] for j in torch.randperm(len(remote), generator=gen)[:top_k]], dtype=torch.int32)
        n = ids.shape[0]
        pad = padding_mask(rows, r)
        hidden = torch.randn((n, hidden_size), generator=gen).to(dtype)
        weights_k = router_weights(gen, n, top_k)
        hidden[pad] = float("nan")
        weights_k[pad] = float("nan")
        ctx = BuildContext(rank=rank, ep_size=2, device=torch.device(self.device), placement=placement,
                           local=padding.local, hidden_size=hidden_size, top_k=top_k, dtype=dtype,
                           max_tokens_per_rank=r, sentinel=padding.sentinel, weights=weights)
        return ExpertsCase(ctx, padding, rows, r, ids, hidden, weights_k, weights)

    def routing(self, case: ExpertsCase, block_m: int | None) -> LocalRouting:
        host: Any = self.build_host(Stage.PREPROCESS, "torch", case.ctx, mode="safe")
        return host.preprocess(case.ids.to(self.device), block_m)

    def run(self, case: ExpertsCase) -> tuple[torch.Tensor, torch.Tensor, LocalRouting, torch.Tensor | None]:
        """Build the backend, compute; returns (output, float64 reference, routing, the out= tensor or None)."""
        experts: Any = self.build(case.ctx)
        block_m = getattr(experts, "block_m", None)
        expect(block_m is None or (isinstance(block_m, int) and block_m > 0),
               f"experts.block_m must be None or a positive int, got {block_m!r}")
        routing = self.routing(case, block_m)
        hidden = case.hidden.to(self.device)
        weights = case.topk_weights.to(self.device)
        kept = (hidden.clone(), weights.clone(), routing.local_ids.clone())
        out = None
        if "out" in inspect.signature(experts.compute).parameters:
            out = torch.full_like(hidden, float("nan"))
            result = experts.compute(hidden, weights, routing, out=out)
        else:
            result = experts.compute(hidden, weights, routing)
        expect(torch.equal(hidden.nan_to_num(7.0), kept[0].nan_to_num(7.0)) and
               torch.equal(weights.nan_to_num(7.0), kept[1].nan_to_num(7.0)) and torch.equal(routing.local_ids, kept[2]),
               "compute modified its inputs (hidden, topk_weights or local_ids)")
        reference = moe_reference(case.hidden.float(), case.topk_weights, routing.local_ids.to("cpu"), case.weights,
                                  torch.float64)
        return result, reference, routing, out

    def test_matches_the_float64_reference(self, hostcore_dtype: torch.dtype,
                                           hostcore_shape: tuple[int, int, int | None]) -> None:
        for index in range(self.cases):
            case = self.make_case(hostcore_dtype, hostcore_shape, index)
            where = self.where(str(case))
            result, reference, routing, out = self.run(case)
            n, h = case.hidden.shape
            expect(isinstance(result, torch.Tensor) and tuple(result.shape) == (n, h),
                   f"compute must return [N, H] = [{n}, {h}], got {getattr(result, 'shape', result)}{where}")
            expect(result.dtype == hostcore_dtype, f"output dtype {result.dtype}, expected {hostcore_dtype}{where}")
            expect(result.device.type == torch.device(self.device).type, f"output on {result.device}{where}")
            if out is not None:
                expect(result.data_ptr() == out.data_ptr(), f"compute got out= but returned another tensor{where}")
            got = result.detach().to("cpu")
            active = (routing.local_ids.to("cpu") >= 0).any(dim=1)
            idle = ~active
            expect(bool((got[idle] == 0).all()) and not bool(got[idle].isnan().any()),
                   f"rows without a local slot must be exactly 0 (rows {idle.nonzero().flatten().tolist()[:10]}; "
                   f"found {got[idle][(got[idle] != 0) | got[idle].isnan()][:4].tolist()}){where}")
            expect(bool(got[active].isfinite().all()), f"non-finite values in rows with local slots{where}")
            err = relative_error(got, reference)
            tol = self.tolerance(hostcore_dtype)
            expect(err <= tol, f"relative Frobenius error {err:.3g} > rtol {tol:.3g} against the float64 reference "
                               f"({int(active.sum())} active rows){where}")

    def test_zero_rows(self) -> None:
        dtype = self.dtypes[0]
        case = self.make_case(dtype, self.shapes[0], 0)
        case.ids, case.hidden, case.topk_weights = case.ids[:0], case.hidden[:0], case.topk_weights[:0]
        result, _, _, _ = self.run(case)
        expect(tuple(result.shape) == (0, case.hidden.shape[1]), f"0 rows in, got {tuple(result.shape)} out"
                                                                f"{self.where(str(case))}")
