"""The sentinel strategies: which id marks the padding rows a one-sided dispatch leaves behind.

Every strategy proposes a *candidate*: a sentinel and the placement the
preprocess must index (its expert map possibly extended by a guard slot). The
verdict on a candidate is `hostcore.contract.sentinel_verdict` on exactly that
map, so the contract is defined in one place; a strategy only adds why it
cannot do better on this layout and what to use instead.

=============== ======================================================= ============================
strategy        sentinel                                                valid (contract holds)
=============== ======================================================= ============================
``negative``    ``-1`` (legacy; vLLM before PR #42034)                  never: reproduction only
``out_of_range`` ``E`` (global_num_experts)                             without a map (or a map that
                                                                        already has a guard slot)
``non_local``   first ``expert_map`` entry equal to -1 (vLLM's fix)     with a map that has a non-local
                                                                        expert
``guard_slot``  ``E``, map extended by one trailing -1 entry            always
``auto``        ``non_local`` if it applies, else ``guard_slot``;       always
                without a map ``out_of_range``
=============== ======================================================= ============================

``choose`` runs on the host at build time and whenever the expert map changes;
the per-forward path only carries the chosen int, so there is no host-device
sync per forward. ``choose`` raises `UnsafeSentinelError` when the verdict
fails, unless the strategy was built with ``allow_unsafe=True`` (to reproduce
the bug on purpose); a strategy that has no candidate at all on a layout
(``non_local`` when every expert is local) raises even then.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from hostcore.contract import Verdict, sentinel_verdict
from hostcore.errors import UnsafeSentinelError
from hostcore.placement import LocalExperts


@dataclass(frozen=True)
class Candidate:
    """What a strategy proposes for one rank.

    ``sentinel`` is ``None`` when the strategy has nothing to propose on this
    layout. ``local`` is the placement the preprocess must index with it.
    ``why_not`` is the strategy-specific advice shown when the contract fails;
    ``via`` names the strategy a composite one (``auto``) delegated to.
    """

    sentinel: int | None
    local: LocalExperts
    why_not: str
    via: str = ""


def describe(local: LocalExperts) -> str:
    """A short description of a rank's placement for messages."""
    e = local.global_num_experts
    if local.expert_map is None:
        return f"E={e}, no expert map, local experts [{local.first}, {local.first + local.count})"
    return f"E={e}, expert map int32[{local.expert_map.numel()}] with {local.count} local experts"


def first_non_local(local: LocalExperts) -> int | None:
    """The first global id whose ``expert_map`` entry is -1, or ``None`` (no map, or every expert local).

    Only the ``E`` entries of real experts count; guard slots are not global ids.
    """
    if local.expert_map is None:
        return None
    body = local.expert_map[: local.global_num_experts].detach().to("cpu")
    hits = (body == -1).nonzero()
    return int(hits[0, 0]) if hits.numel() else None


def with_guard_slot(local: LocalExperts) -> LocalExperts:
    """``local`` with its map extended by one trailing -1 (same device and dtype); unchanged if it has one already."""
    table = local.expert_map
    if table is None or local.guard_slots > 0:
        return local
    return local.with_map(torch.cat([table, table.new_full((1,), -1)]))


class SentinelBase:
    """Shared `SentinelStrategy` machinery; subclasses implement `candidate`."""

    name: ClassVar[str] = ""

    def __init__(self, allow_unsafe: bool = False) -> None:
        self.allow_unsafe = bool(allow_unsafe)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(allow_unsafe={self.allow_unsafe})"

    def candidate(self, local: LocalExperts) -> Candidate:
        """The sentinel this strategy proposes on ``local`` and the placement to index it with."""
        raise NotImplementedError

    def verdict(self, local: LocalExperts) -> Verdict:
        """`sentinel_verdict` on the candidate (after any map extension), plus this strategy's advice."""
        return self._judge(self.candidate(local))

    def _judge(self, cand: Candidate) -> Verdict:
        who = f"{self.name} (as {cand.via})" if cand.via else self.name
        if cand.sentinel is None:
            return Verdict(False, f"{who}: {cand.why_not}")
        v = sentinel_verdict(cand.sentinel, cand.local.global_num_experts, cand.local.expert_map)
        if v.ok:
            return Verdict(True, f"{who}: sentinel {cand.sentinel}: {v.reason}")
        return Verdict(False, f"{who}: sentinel {cand.sentinel}: {v.reason}; {cand.why_not}")

    def choose(self, local: LocalExperts) -> tuple[int, LocalExperts]:
        """The sentinel and the placement the preprocess must use; see the module docstring for errors."""
        cand = self.candidate(local)
        v = self._judge(cand)
        if v.ok:
            return cand.sentinel, cand.local  # type: ignore[return-value]
        expected = ("a sentinel s with 0 <= s < len(expert_map) and expert_map[s] == -1 (this rank has an expert map)"
                    if cand.local.expert_map is not None
                    else f"a sentinel s >= E={local.global_num_experts} (this rank has no expert map)")
        if cand.sentinel is None:
            raise UnsafeSentinelError(
                f"sentinel={self.name} cannot be used on this rank ({describe(local)}): {v.reason}. "
                f"It has no sentinel to offer here, so allow_unsafe cannot help. Expected {expected}. "
                "Use sentinel=auto, which picks a valid one for every layout.")
        if self.allow_unsafe:
            return cand.sentinel, cand.local
        raise UnsafeSentinelError(
            f"sentinel={self.name} gives {cand.sentinel}, which breaks the sentinel contract on this rank "
            f"({describe(local)}): {v.reason}. Expected {expected}. Use sentinel=auto (the safest valid choice for "
            f"this layout), or sentinel={self.name}(allow_unsafe=true) to reproduce the bug on purpose.")


class Negative(SentinelBase):
    """``-1``: the legacy sentinel (vLLM before PR #42034). Never satisfies the contract."""

    name = "negative"

    def candidate(self, local: LocalExperts) -> Candidate:
        return Candidate(-1, local, "negative is the legacy sentinel of vLLM PR #42034, kept only to reproduce the "
                                    "bug; use auto")


class OutOfRange(SentinelBase):
    """``global_num_experts``: valid without an expert map; with a plain map it indexes one past the end."""

    name = "out_of_range"

    def candidate(self, local: LocalExperts) -> Candidate:
        return Candidate(local.global_num_experts, local,
                         "out_of_range is valid only without an expert map (or after guard_slot extended it); "
                         "with a map use non_local, guard_slot or auto")


class NonLocal(SentinelBase):
    """The first global id whose ``expert_map`` entry is -1 (vLLM's fix); needs a map with a non-local expert."""

    name = "non_local"

    def candidate(self, local: LocalExperts) -> Candidate:
        if local.expert_map is None:
            return Candidate(None, local, "there is no expert map, so no map entry equal to -1 to pick; "
                                          "use out_of_range or auto")
        s = first_non_local(local)
        if s is None:
            return Candidate(None, local, "every expert is local on this rank (ep_size 1 with a map, or "
                                          "replicated experts): no non-local id exists; use guard_slot or auto")
        return Candidate(s, local, "the expert map changed between choosing and checking; re-choose the sentinel")


class GuardSlot(SentinelBase):
    """``global_num_experts`` with the map extended by one trailing -1: holds even when every expert is local."""

    name = "guard_slot"

    def candidate(self, local: LocalExperts) -> Candidate:
        return Candidate(local.global_num_experts, with_guard_slot(local),
                         "the guard slot is missing from the map; pass the placement guard_slot returned")


class Auto(SentinelBase):
    """The safest valid choice: ``non_local`` if the map has a non-local expert, else ``guard_slot``;
    ``out_of_range`` without a map."""

    name = "auto"

    def candidate(self, local: LocalExperts) -> Candidate:
        if local.expert_map is None:
            pick: SentinelBase = OutOfRange()
        elif first_non_local(local) is not None:
            pick = NonLocal()
        else:
            pick = GuardSlot()
        return replace(pick.candidate(local), via=pick.name)


STRATEGIES: dict[str, type[SentinelBase]] = {cls.name: cls for cls in (Negative, OutOfRange, NonLocal, GuardSlot, Auto)}
"""The strategies by config name, in the order ``hostcore plugins`` lists them."""
