"""Expert layouts the contract tests run on, and the padding sentinels that are valid on them.

A `Layout` is one rank's view of an `ExpertPlacement` (with or without an
expert map). Kinds:

``contiguous``
    rank ``r`` owns one block of ids (`ExpertPlacement.contiguous`); the only kind
    that also runs without a map.
``round_robin``
    expert ``e`` on rank ``e % ep_size``.
``random``
    arbitrary owners: non-uniform, ranks may own nothing.
``replicated``
    every expert is local on the rank under test (as with replicated experts,
    or ``ep_size == 1`` with a map): its map has no -1 entry.

`random_layout` draws one from a `random.Random` (used by the kit, seeded by
``--hostcore-seed``); `hostcore.conformance.strategies` draws the same
parameters with hypothesis.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..contract import sentinel_verdict
from ..errors import ContractError
from ..placement import ExpertPlacement, LocalExperts

KINDS = ("contiguous", "round_robin", "random", "replicated")


@dataclass(frozen=True)
class Layout:
    """One rank (``rank``) of a placement, seen with or without an expert map."""

    kind: str
    placement: ExpertPlacement
    rank: int
    use_map: bool

    @property
    def global_num_experts(self) -> int:
        return self.placement.global_num_experts

    @property
    def ep_size(self) -> int:
        return self.placement.ep_size

    def local(self, device: torch.device | str = "cpu") -> LocalExperts:
        """The rank's `LocalExperts` (a fresh map tensor on ``device``)."""
        local = self.placement.local_experts(self.rank, self.use_map, device)
        if local.expert_map is not None:
            local = local.with_map(local.expert_map.clone())
        return local

    def __str__(self) -> str:
        owners = "" if self.kind != "random" else f" owners={list(self.placement.owner)}"
        return (f"{self.kind} E={self.global_num_experts} ep_size={self.ep_size} rank={self.rank} "
                f"{'with' if self.use_map else 'without'} map{owners}")


def make_layout(kind: str, num_experts: int, ep_size: int, rank: int, use_map: bool,
                owners: Sequence[int] | None = None) -> Layout:
    """Build a `Layout`; ``owners`` is required for (and only used by) kind ``random``.

    ``use_map=False`` is only possible for contiguous placements; it raises
    `ContractError` otherwise.
    """
    if kind == "contiguous":
        placement = ExpertPlacement.contiguous(num_experts, ep_size)
    elif kind == "round_robin":
        placement = ExpertPlacement.round_robin(num_experts, ep_size)
    elif kind == "random":
        if owners is None or len(owners) != num_experts:
            raise ContractError(f"kind 'random' needs {num_experts} owners, got {owners!r}")
        placement = ExpertPlacement.from_owners(owners, ep_size)
    elif kind == "replicated":
        placement = ExpertPlacement.from_owners([rank] * num_experts, ep_size)
    else:
        raise ContractError(f"unknown layout kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not 0 <= rank < ep_size:
        raise ContractError(f"rank {rank} is outside [0, ep_size={ep_size})")
    if not use_map and not placement.is_contiguous():
        raise ContractError(f"a {kind} placement needs an expert map (only contiguous ones run without)")
    return Layout(kind, placement, rank, use_map)


def random_layout(rng: random.Random, kinds: Sequence[str] = KINDS, max_experts: int = 160,
                  max_ep_size: int = 64, allow_no_map: bool = True) -> Layout:
    """Draw a layout: a kind from ``kinds``, ``E`` in ``[1, max_experts]``, ``ep_size`` in ``[1, max_ep_size]``."""
    kind = rng.choice(list(kinds))
    ep_size = rng.randint(1, max_ep_size)
    num_experts = rng.randint(1, max_experts)
    rank = rng.randrange(ep_size)
    owners = [rng.randrange(ep_size) for _ in range(num_experts)] if kind == "random" else None
    probe = make_layout(kind, num_experts, ep_size, rank, True, owners)
    use_map = not (allow_no_map and probe.placement.is_contiguous() and rng.random() < 0.4)
    return make_layout(kind, num_experts, ep_size, rank, use_map, owners)


@dataclass(frozen=True)
class PaddingSentinel:
    """A sentinel valid on one rank and the placement to index it with (``how``: which rule made it)."""

    how: str
    sentinel: int
    local: LocalExperts


def valid_sentinels(local: LocalExperts) -> list[PaddingSentinel]:
    """Every sentinel the contract allows by the standard rules, safest-first; each checked by `sentinel_verdict`.

    With a map: the first non-local global id (``non_local``) when one exists, and
    ``E`` with the map extended by a -1 guard slot (``guard_slot``). Without a map:
    ``E`` (``out_of_range``). The first entry is what ``sentinel=auto`` picks.
    Derived from the contract here so the kit does not depend on any sentinel plugin.
    """
    e = local.global_num_experts
    out: list[PaddingSentinel] = []
    table = local.expert_map
    if table is None:
        out.append(PaddingSentinel("out_of_range", e, local))
    else:
        hits = (table[:e].to("cpu") == -1).nonzero()
        if hits.numel():
            out.append(PaddingSentinel("non_local", int(hits[0, 0]), local))
        guarded = local if local.guard_slots else local.with_map(torch.cat([table, table.new_full((1,), -1)]))
        out.append(PaddingSentinel("guard_slot", e, guarded))
    for p in out:
        verdict = sentinel_verdict(p.sentinel, e, p.local.expert_map)
        if not verdict.ok:  # a bug in this function, not in the backend under test
            raise AssertionError(f"conformance kit: {p.how} sentinel {p.sentinel} is not valid: {verdict.reason}")
    return out


def auto_sentinel(local: LocalExperts) -> PaddingSentinel:
    """The sentinel ``sentinel=auto`` semantics give: the first of `valid_sentinels`."""
    return valid_sentinels(local)[0]
