"""A plugin of deliberately broken backends, one known bug each: the conformance kit must catch every one.

Registered by hand (``plugin = "conformance.broken_backends"`` on a contract class; tests/ is on the pythonpath), never
installed. Names start with ``broken_``.
"""

from __future__ import annotations

import random

import torch

from hostcore import Backend, BuildContext, Stage, Verdict, hookimpl, sentinel_verdict
from hostcore.backends.dispatch_torch import TorchAllToAllDispatch
from hostcore.backends.experts_torch import TorchExperts
from hostcore.backends.preprocess_torch import TorchPreprocess
from hostcore.contract import AlignedLayout, LocalRouting, ReceivedTokens
from hostcore.errors import UnsafeSentinelError
from hostcore.hookspecs import Register
from hostcore.placement import LocalExperts

hostcore_api_version = 1


class LyingNegative:
    """Returns -1 and claims it is fine."""

    name = "broken_lying_negative"

    def __init__(self, ctx: BuildContext) -> None:
        pass

    def verdict(self, local: LocalExperts) -> Verdict:
        return Verdict(True, "trust me")

    def choose(self, local: LocalExperts) -> tuple[int, LocalExperts]:
        return -1, local


class NoGuard:
    """Honest verdict for E on the plain map, but choose never refuses (forgot to extend the map)."""

    name = "broken_no_guard"

    def __init__(self, ctx: BuildContext) -> None:
        pass

    def verdict(self, local: LocalExperts) -> Verdict:
        return sentinel_verdict(local.global_num_experts, local.global_num_experts, local.expert_map)

    def choose(self, local: LocalExperts) -> tuple[int, LocalExperts]:
        return local.global_num_experts, local


class Fickle:
    """Valid, but picks a random non-local id each time: not deterministic."""

    name = "broken_fickle"

    def __init__(self, ctx: BuildContext) -> None:
        self.rng = random.Random()

    def _pick(self, local: LocalExperts) -> tuple[int, LocalExperts]:
        if local.expert_map is None:
            return local.global_num_experts + self.rng.randrange(3), local
        table = torch.cat([local.expert_map, local.expert_map.new_full((2,), -1)])
        choices = (table == -1).nonzero().flatten().tolist()
        return self.rng.choice(choices), local.with_map(table)

    def verdict(self, local: LocalExperts) -> Verdict:
        s, chosen = self._pick(local)
        return sentinel_verdict(s, local.global_num_experts, chosen.expert_map)

    def choose(self, local: LocalExperts) -> tuple[int, LocalExperts]:
        s, chosen = self._pick(local)
        if not self.verdict(local).ok:
            raise UnsafeSentinelError("unreachable")
        return s, chosen


class WrappingPreprocess(TorchPreprocess):
    """Looks ids up without a lower bound check: a negative id wraps to the end of the map (the bug)."""

    def _lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.expert_map is None:
            return super()._lookup(ids)
        table = self.expert_map
        size = table.numel()
        local = torch.where(ids < size, table[ids.clamp(min=-size, max=size - 1).long()], -1).to(torch.int32)
        return local, (ids >= size).sum().to(torch.int32).reshape(1)


class BadPaddingPreprocess(TorchPreprocess):
    """Pads expert groups with -1 instead of N*K."""

    def preprocess(self, topk_ids: torch.Tensor, block_m: int | None = None) -> LocalRouting:
        routing = super().preprocess(topk_ids, block_m)
        if routing.aligned is None:
            return routing
        a = routing.aligned
        slots = torch.where(a.sorted_slot_ids == topk_ids.numel(), -1, a.sorted_slot_ids)
        return LocalRouting(routing.local_ids, routing.expert_counts, routing.invalid_count,
                            AlignedLayout(slots, a.block_expert_ids, a.num_slots_post_padded, a.block_m))


class SentinelCountingPreprocess(TorchPreprocess):
    """Counts every id >= E as invalid, the guard-slot sentinel included."""

    def preprocess(self, topk_ids: torch.Tensor, block_m: int | None = None) -> LocalRouting:
        routing = super().preprocess(topk_ids, block_m)
        e = self.local.global_num_experts
        invalid = ((topk_ids < 0) | (topk_ids >= e)).sum().to(torch.int32).reshape(1)
        return LocalRouting(routing.local_ids, routing.expert_counts, invalid, routing.aligned)


class PaddingComputingExperts(TorchExperts):
    """Computes every slot (-1 slots on expert 0 with weight 0): stale NaN padding leaks into the output."""

    def compute(self, hidden: torch.Tensor, topk_weights: torch.Tensor, routing: LocalRouting) -> torch.Tensor:
        local = routing.local_ids
        weights = torch.where(local >= 0, topk_weights, 0.0)
        everything = torch.where(local >= 0, local, 0)
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        for e in range(self.weights.num_experts):
            w13, w2 = self.weights.dequantized(e)
            inter = self.weights.intermediate_size
            gate_up = hidden.float() @ w13
            act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            scale = (weights * (everything == e)).sum(dim=1, keepdim=True)
            out += (act @ w2) * scale
        return out.to(hidden.dtype)


class UnweightedExperts(TorchExperts):
    """Forgets the router weights (treats them as 1)."""

    def compute(self, hidden: torch.Tensor, topk_weights: torch.Tensor, routing: LocalRouting) -> torch.Tensor:
        return super().compute(hidden, torch.ones_like(topk_weights), routing)


class MinusOnePaddingDispatch(TorchAllToAllDispatch):
    """Marks padding rows with -1 instead of the configured sentinel (vLLM PR #42034's bug)."""

    def dispatch(self, tokens, rows_per_rank=None) -> ReceivedTokens:  # type: ignore[no-untyped-def]
        got = super().dispatch(tokens, rows_per_rank)
        r = got.topk_ids.shape[1]
        padding = torch.arange(r).view(1, r, 1) >= got.rows_per_source.view(-1, 1, 1)
        ids = torch.where(padding, -1, got.topk_ids)
        return ReceivedTokens(got.hidden, ids, got.topk_weights, got.sentinel, got.rows_per_source)


class DoublingCombineDispatch(TorchAllToAllDispatch):
    """Combine counts every contribution twice."""

    def combine(self, expert_out: torch.Tensor) -> torch.Tensor:
        return super().combine(expert_out) * 2


@hookimpl
def hostcore_register_sentinel(register: Register) -> None:
    for cls in (LyingNegative, NoGuard, Fickle):
        register(Backend(Stage.SENTINEL, cls.name, cls, cls.__doc__ or ""))


@hookimpl
def hostcore_register_preprocess(register: Register) -> None:
    register(Backend(Stage.PREPROCESS, "broken_wrapping", WrappingPreprocess, "negative ids wrap"))
    register(Backend(Stage.PREPROCESS, "broken_bad_padding", BadPaddingPreprocess, "groups padded with -1"))
    register(Backend(Stage.PREPROCESS, "broken_counts_sentinel", SentinelCountingPreprocess, "sentinel counted"))


@hookimpl
def hostcore_register_experts(register: Register) -> None:
    register(Backend(Stage.EXPERTS, "broken_padding", PaddingComputingExperts, "computes padding rows"))
    register(Backend(Stage.EXPERTS, "broken_unweighted", UnweightedExperts, "ignores router weights"))
    register(Backend(Stage.EXPERTS, "broken_unavailable", TorchExperts, "never runs here",
                     availability=lambda: "needs a flux capacitor"))


@hookimpl
def hostcore_register_dispatch(register: Register) -> None:
    register(Backend(Stage.DISPATCH, "broken_minus_one", MinusOnePaddingDispatch, "padding marked -1"))
    register(Backend(Stage.DISPATCH, "broken_doubling", DoublingCombineDispatch, "combine doubles"))

