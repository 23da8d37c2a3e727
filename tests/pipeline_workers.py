"""Per-rank functions of the pipeline tests (a module of its own so spawned ranks can import them)."""

from __future__ import annotations

import torch

from hostcore.contract import check_received
from hostcore.errors import ContractError, UnsafeSentinelError
from hostcore.layer import EPMoELayer, padding_mask
from hostcore.placement import ExpertPlacement
from hostcore.workload import MoEShape, dense_reference, experts_weights, synthetic_router_output, uneven_token_counts

SHAPE = MoEShape("test", 256, 128, 10, 3)  # 10 experts: not divisible by 4 ranks


def build_layer(rank: int, world: int, backends: str, use_map: bool, placement: ExpertPlacement, tokens: list[int]):
    local = placement.local_experts(rank, use_map).global_ids()
    return EPMoELayer(placement, experts_weights(SHAPE, local, seed=1), hidden_size=SHAPE.hidden_size,
                      top_k=SHAPE.top_k, max_tokens_per_rank=max(tokens) + 1, dtype=torch.float32, rank=rank,
                      backends=backends, use_expert_map=use_map)


def forward_case(rank: int, world: int, backends: str, use_map: bool, kind: str) -> dict:
    placement = getattr(ExpertPlacement, kind)(SHAPE.num_experts, world)
    tokens = uneven_token_counts(7, world)
    router = synthetic_router_output(SHAPE, tokens[rank], seed=1, rank=rank, dtype=torch.float32, skip_fraction=0.2)
    result: dict = {"tokens": tokens[rank]}
    try:
        layer = build_layer(rank, world, backends, use_map, placement, tokens)
    except UnsafeSentinelError as exc:
        return {**result, "refused": str(exc)}
    try:
        out, trace = layer.forward_traced(router.hidden, router.topk_ids, router.topk_weights, max(tokens) + 1)
    except ContractError as exc:
        return {**result, "forward_error": str(exc)}
    ref = dense_reference(router, SHAPE, seed=1, compute_dtype=torch.float64)
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    err = float((out.double() - ref).abs().max()) / scale if ref.numel() else 0.0
    return {**result, "rel_err": err, "trace": trace, "sentinel": layer.sentinel,
            "last_local_is_mapped_by_minus_one": use_map and int(layer.local.expert_map[-1]) >= 0}


def all_cases(rank: int, world: int, cases: list[tuple[str, bool, str]]) -> list[dict]:
    return [forward_case(rank, world, *case) for case in cases]


def received_rows(rank: int, world: int) -> dict:
    placement = ExpertPlacement.contiguous(SHAPE.num_experts, world)
    tokens = [5, 3, 0, 4]
    layer = build_layer(rank, world, "sentinel=auto", True, placement, tokens)
    ids = torch.full((tokens[rank], SHAPE.top_k), -1, dtype=torch.int32)
    if tokens[rank]:
        ids[0] = torch.tensor([0, 9, -1])  # one real token with a skipped slot; the others fully skipped
    prepared = layer.prepare.prepare(torch.randn(tokens[rank], SHAPE.hidden_size), ids, torch.rand(ids.shape))
    received = layer.dispatch.dispatch(prepared, max(tokens))
    check_received(received, SHAPE.num_experts)
    real = received.rows_per_source.tolist()
    layer.dispatch.combine(received.hidden.new_zeros(received.hidden.shape))
    return {"real_rows_from": real, "padding": int(padding_mask(received).sum())}


def remapped_forward(rank: int, world: int) -> dict:
    """Build on a contiguous placement, remap to round-robin (as EPLB would), then run a forward."""
    before = ExpertPlacement.contiguous(SHAPE.num_experts, world)
    after = ExpertPlacement.round_robin(SHAPE.num_experts, world)
    tokens = [4, 3, 0, 5][:world]
    layer = build_layer(rank, world, "sentinel=non_local", True, before, tokens)
    chosen_before = layer.sentinel
    layer.remap(after, experts_weights(SHAPE, after.local_experts(rank, True).global_ids(), seed=1))
    router = synthetic_router_output(SHAPE, tokens[rank], seed=2, rank=rank, dtype=torch.float32)
    out = layer.forward(router.hidden, router.topk_ids, router.topk_weights, max(tokens) + 1)
    ref = dense_reference(router, SHAPE, seed=1, compute_dtype=torch.float64)
    rel = float((out.double() - ref).norm() / ref.norm()) if ref.numel() else 0.0
    return {"before": chosen_before, "after": layer.sentinel, "map_after": layer.local.expert_map.tolist(),
            "rel_err": rel}
