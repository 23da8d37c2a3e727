"""`EPMoELayer`: one expert-parallel MoE layer on one rank, its stages resolved once at build.

Build resolves the configuration through the registry: the sentinel strategy
first (it may extend the expert map with guard slots, and refuses unsafe
choices), then prepare, dispatch, preprocess and experts with a `BuildContext`
that carries the chosen sentinel and final placement. `forward` then calls the
five resolved objects directly; it never goes through the hook caller and
never syncs with the host (unless a backend documents that it does, e.g. a
dispatch agreeing on ``R`` or ``preprocess=torch(mode=checked)``).
`forward_traced` is the instrumented variant for the CLI and tests.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .config import BackendConfig, resolve_config
from .contract import LocalRouting, ReceivedTokens, Stage
from .errors import ContractError
from .hookspecs import BuildContext, SentinelStrategy
from .placement import ExpertPlacement, LocalExperts
from .quant import QuantizedExperts
from .registry import Registry, get_registry


@dataclass
class StageTrace:
    """What one traced forward saw on this rank (host-side numbers; produced with syncs)."""

    tokens: int = 0
    rows_per_rank: int = 0
    padding_rows: int = 0
    rows_per_local_expert: list[int] = field(default_factory=list)
    misrouted_rows: int = 0
    misrouted_to: dict[int, int] = field(default_factory=dict)
    invalid_ids: int | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)


class EPMoELayer:
    """An EP MoE layer on rank ``rank`` of ``placement.ep_size``.

    ``weights`` are this rank's local experts in local-id order (see
    `ExpertPlacement.local_experts`); ``use_expert_map`` defaults to
    ``ep_size > 1`` (without a map the placement must be contiguous).
    """

    def __init__(self, placement: ExpertPlacement, weights: QuantizedExperts, *, hidden_size: int, top_k: int,
                 max_tokens_per_rank: int, dtype: torch.dtype = torch.bfloat16, rank: int = 0,
                 device: torch.device | str = "cpu", group: Any = None, backends: str | BackendConfig | None = None,
                 use_expert_map: bool | None = None, registry: Registry | None = None) -> None:
        self.config = resolve_config(backends)
        self.registry = registry or get_registry()
        self.placement = placement
        self.device = torch.device(device)
        use_map = placement.ep_size > 1 if use_expert_map is None else use_expert_map
        self.use_expert_map = use_map
        if weights.hidden_size != hidden_size:
            raise ContractError(f"weights have H={weights.hidden_size}, the layer was asked for hidden_size={hidden_size}")
        local = placement.local_experts(rank, use_map, self.device)
        self._ctx = BuildContext(rank=rank, ep_size=placement.ep_size, device=self.device, placement=placement,
                                 local=local, hidden_size=hidden_size, top_k=top_k, dtype=dtype,
                                 max_tokens_per_rank=max_tokens_per_rank, group=group, weights=weights)
        self.sentinel_strategy: SentinelStrategy = self._build(Stage.SENTINEL, self._ctx)
        self._resolve(local)

    def _build(self, stage: Stage, ctx: BuildContext) -> Any:
        return self.registry.build(stage, self.config[stage], ctx)

    def _resolve(self, local: LocalExperts) -> None:
        self.sentinel, self.local = self.sentinel_strategy.choose(local)
        ctx = replace(self._ctx, local=self.local, sentinel=self.sentinel)
        self.prepare = self._build(Stage.PREPARE, ctx)
        self.dispatch = self._build(Stage.DISPATCH, ctx)
        self.preprocess = self._build(Stage.PREPROCESS, ctx)
        self.experts = self._build(Stage.EXPERTS, ctx)
        # Zero-copy combine when both sides support it: experts write into the dispatch's own workspace.
        self._write_into_combine_buffer = (hasattr(self.dispatch, "combine_input_buffer")
                                           and "out" in inspect.signature(self.experts.compute).parameters)

    def remap(self, placement: ExpertPlacement, weights: QuantizedExperts) -> None:
        """Adopt a new placement (e.g. after EPLB): the sentinel is re-chosen for the new map and stages rebuilt."""
        if placement.global_num_experts != self.placement.global_num_experts or placement.ep_size != self.placement.ep_size:
            raise ContractError("remap keeps the number of experts and ranks; build a new layer to change them")
        self.placement = placement
        local = placement.local_experts(self._ctx.rank, self.use_expert_map, self.device)
        self._ctx = replace(self._ctx, placement=placement, local=local, weights=weights)
        self._resolve(local)

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                rows_per_rank: int | None = None) -> torch.Tensor:
        """Router output on this rank -> ``[T, H]`` MoE output. A collective: every rank calls it."""
        tokens = self.prepare.prepare(hidden, topk_ids, topk_weights)
        received = self.dispatch.dispatch(tokens, rows_per_rank)
        x, ids, weights = received.flat()
        with self._combine_on_failure(received):
            routing = self.preprocess.preprocess(ids, self.experts.block_m)
            out = self._compute(x, weights, routing)
        return self.dispatch.combine(out.view(received.ep_size, received.rows_per_rank, -1))

    def forward_traced(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       rows_per_rank: int | None = None) -> tuple[torch.Tensor, StageTrace]:
        """`forward` with a sync and a host timer around each stage, and what the padding rows did."""
        trace = StageTrace(tokens=int(hidden.shape[0]))
        tokens = self._timed(trace, "prepare", lambda: self.prepare.prepare(hidden, topk_ids, topk_weights))
        received = self._timed(trace, "dispatch", lambda: self.dispatch.dispatch(tokens, rows_per_rank))
        x, ids, weights = received.flat()
        with self._combine_on_failure(received):
            routing = self._timed(trace, "preprocess", lambda: self.preprocess.preprocess(ids, self.experts.block_m))
            out = self._timed(trace, "experts", lambda: self._compute(x, weights, routing))
            _describe_padding(trace, received, routing)  # before combine: received may be a workspace view
        result = self._timed(trace, "combine", lambda: self.dispatch.combine(
            out.view(received.ep_size, received.rows_per_rank, -1)))
        return result, trace

    def _compute(self, hidden: torch.Tensor, weights: torch.Tensor, routing: LocalRouting) -> torch.Tensor:
        if self._write_into_combine_buffer:
            buffer = self.dispatch.combine_input_buffer()
            if buffer.is_contiguous() and buffer.dtype == hidden.dtype and buffer.numel() == hidden.numel():
                return self.experts.compute(hidden, weights, routing, out=buffer.view(hidden.shape))
        return self.experts.compute(hidden, weights, routing)

    @contextmanager
    def _combine_on_failure(self, received: ReceivedTokens) -> Iterator[None]:
        """If a stage between dispatch and combine raises, still take part in the combine collective
        (with a zero output) before re-raising, so the other ranks are not left waiting forever."""
        try:
            yield
        except Exception:
            self.dispatch.combine(received.hidden.new_zeros(received.hidden.shape))
            raise

    def _timed(self, trace: StageTrace, name: str, step: Callable[[], Any]) -> Any:
        _sync(self.device)
        start = time.perf_counter()
        value = step()
        _sync(self.device)
        trace.stage_ms[name] = (time.perf_counter() - start) * 1e3
        return value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def padding_mask(received: ReceivedTokens) -> torch.Tensor:
    """``bool[ep_size * R]``: the padding rows (from ``rows_per_source``, else rows whose ids all equal the sentinel)."""
    if received.rows_per_source is not None:
        rows = torch.arange(received.rows_per_rank, device=received.topk_ids.device)
        return (rows.view(1, -1) >= received.rows_per_source.view(-1, 1)).reshape(-1)
    return (received.topk_ids == received.sentinel).all(dim=2).reshape(-1)


def _describe_padding(trace: StageTrace, received: ReceivedTokens, routing: LocalRouting) -> None:
    pad = padding_mask(received)
    trace.rows_per_rank = received.rows_per_rank
    trace.padding_rows = int(pad.sum())
    trace.rows_per_local_expert = routing.expert_counts.tolist()
    routed = routing.local_ids[pad]
    misrouted = (routed >= 0).any(dim=1) if routed.numel() else torch.zeros(0, dtype=torch.bool)
    trace.misrouted_rows = int(misrouted.sum())
    targets = routed[routed >= 0].tolist()
    trace.misrouted_to = {e: targets.count(e) for e in sorted(set(targets))}
    trace.invalid_ids = None if routing.invalid_count is None else int(routing.invalid_count.sum())
