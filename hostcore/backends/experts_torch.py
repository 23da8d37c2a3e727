"""Experts backend ``torch``: the W4A16 reference every expert kernel is checked against.

GPTQ symmetric int4 weights (`hostcore.quant`, group size 128 or per-channel)
are dequantized per expert, and each local expert runs
``w2 (silu(x w13[:, :I]) * x w13[:, I:])`` on the slots routed to it, in
``compute_dtype`` (fp32 default, fp64 for checking kernels), then the router
weight of each slot is applied and slots of one row are summed. Only local
experts are computed; slots with local id -1 cost nothing. Output in the
activation dtype.
"""

from __future__ import annotations

import torch

from ..contract import ACTIVATION_DTYPES, LocalRouting
from ..errors import ContractError
from ..hookspecs import BuildContext
from ..quant import QuantizedExperts

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TorchExperts:
    block_m = None

    def __init__(self, ctx: BuildContext, compute_dtype: str = "float32") -> None:
        if ctx.weights is None:
            raise ContractError("the torch experts backend needs the rank's expert weights (BuildContext.weights)")
        if ctx.weights.num_experts != ctx.local.count:
            raise ContractError(f"got weights for {ctx.weights.num_experts} experts but this rank has "
                                f"{ctx.local.count} local experts: pass the local experts' weights in local-id order")
        self.weights: QuantizedExperts = ctx.weights.to(ctx.device)
        self.compute_dtype = COMPUTE_DTYPES[compute_dtype]

    def compute(self, hidden: torch.Tensor, topk_weights: torch.Tensor, routing: LocalRouting,
                out: torch.Tensor | None = None) -> torch.Tensor:
        result = moe_reference(hidden, topk_weights, routing.local_ids, self.weights, self.compute_dtype)
        if out is None:
            return result
        if out.shape != result.shape or out.dtype != result.dtype:
            raise ContractError(f"out must be {result.dtype} {tuple(result.shape)}, got {out.dtype} {tuple(out.shape)}")
        return out.copy_(result)


def moe_reference(hidden: torch.Tensor, topk_weights: torch.Tensor, local_ids: torch.Tensor,
                  weights: QuantizedExperts, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, H]`` MoE output of the slots ``local_ids [N, K]`` (-1 skipped) with router ``topk_weights [N, K]``."""
    if hidden.dtype not in (*ACTIVATION_DTYPES, torch.float64) or hidden.dim() != 2:
        raise ContractError(f"hidden must be bf16/fp16/fp32/fp64 [N, H], got {hidden.dtype} {tuple(hidden.shape)}")
    if hidden.shape[1] != weights.hidden_size:
        raise ContractError(f"hidden has H={hidden.shape[1]} but the expert weights were made for H={weights.hidden_size}")
    if local_ids.shape != topk_weights.shape or local_ids.shape[0] != hidden.shape[0]:
        raise ContractError(f"local_ids {tuple(local_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                            f"must both be [N, K] with N={hidden.shape[0]}")
    inter = weights.intermediate_size
    out = torch.zeros(hidden.shape, dtype=compute_dtype, device=hidden.device)
    x_all = hidden.to(compute_dtype)
    w_all = topk_weights.to(compute_dtype)
    for e in torch.unique(local_ids[local_ids >= 0]).tolist():
        if e >= weights.num_experts:
            raise ContractError(f"local id {e} has no weights (this rank holds {weights.num_experts} experts)")
        rows, slots = (local_ids == e).nonzero(as_tuple=True)
        w13, w2 = (w.to(compute_dtype) for w in weights.dequantized(e))
        gate_up = x_all[rows] @ w13
        act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out.index_add_(0, rows, (act @ w2) * w_all[rows, slots].unsqueeze(1))
    return out.to(hidden.dtype)
