"""Where experts live: the placement of global experts on EP ranks and each rank's view of it.

`ExpertPlacement` is the whole group's picture (which rank computes each global
expert); `LocalExperts` is what one rank's preprocess, experts and sentinel see:
either an expert map, or, without one, a contiguous range of global ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .contract import check_expert_map
from .errors import ContractError


@dataclass(frozen=True)
class LocalExperts:
    """One rank's view of expert placement, as preprocess and experts need it.

    With ``expert_map`` (``int32[E + guards]``, see `hostcore.contract`) global
    ids are translated through the map. Without one, the local experts are the
    global ids ``[first, first + count)`` and local id = global id - ``first``;
    ``ep_size == 1`` without a map is ``first=0, count=E``.
    """

    global_num_experts: int
    count: int
    expert_map: torch.Tensor | None = None
    first: int = 0

    def __post_init__(self) -> None:
        if self.expert_map is not None:
            check_expert_map(self.expert_map, self.global_num_experts)
        elif not (0 <= self.first and self.first + self.count <= self.global_num_experts):
            raise ContractError(f"local range [{self.first}, {self.first + self.count}) is outside [0, {self.global_num_experts})")

    @property
    def guard_slots(self) -> int:
        return 0 if self.expert_map is None else int(self.expert_map.numel()) - self.global_num_experts

    def with_map(self, expert_map: torch.Tensor) -> LocalExperts:
        """The same placement with a replaced map (e.g. extended by guard slots)."""
        return replace(self, expert_map=expert_map)

    def global_ids(self) -> list[int]:
        """Global ids of the local experts, in local-id order (host-side, build time)."""
        if self.expert_map is None:
            return list(range(self.first, self.first + self.count))
        table = self.expert_map[: self.global_num_experts].to("cpu")
        order = sorted((int(v), g) for g, v in enumerate(table.tolist()) if v >= 0)
        return [g for _, g in order]


@dataclass(frozen=True)
class ExpertPlacement:
    """Which EP rank computes each global expert: ``owner[e]`` in ``[0, ep_size)``.

    A partition: each expert is computed by exactly one rank, the rank dispatch
    sends its tokens to. (Replicas, as EPLB makes them, are distinct physical
    global ids.) Local ids on a rank follow increasing global id.
    """

    ep_size: int
    owner: tuple[int, ...]
    _maps: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ContractError(f"ep_size must be >= 1, got {self.ep_size}")
        if not self.owner:
            raise ContractError("a placement needs at least one expert")
        bad = [(e, r) for e, r in enumerate(self.owner) if not 0 <= r < self.ep_size]
        if bad:
            raise ContractError(f"expert {bad[0][0]} is owned by rank {bad[0][1]}, outside [0, {self.ep_size})")

    @property
    def global_num_experts(self) -> int:
        return len(self.owner)

    @classmethod
    def contiguous(cls, global_num_experts: int, ep_size: int) -> ExpertPlacement:
        """Rank ``r`` owns a contiguous block; with ``E % ep_size != 0`` the first ranks get one more."""
        base, extra = divmod(global_num_experts, ep_size)
        owner: list[int] = []
        for r in range(ep_size):
            owner += [r] * (base + (1 if r < extra else 0))
        return cls(ep_size, tuple(owner))

    @classmethod
    def round_robin(cls, global_num_experts: int, ep_size: int) -> ExpertPlacement:
        """Expert ``e`` lives on rank ``e % ep_size``."""
        return cls(ep_size, tuple(e % ep_size for e in range(global_num_experts)))

    @classmethod
    def from_owners(cls, owner: Sequence[int], ep_size: int) -> ExpertPlacement:
        return cls(ep_size, tuple(int(r) for r in owner))

    def is_contiguous(self) -> bool:
        return list(self.owner) == sorted(self.owner)

    def local_count(self, rank: int) -> int:
        return sum(1 for r in self.owner if r == rank)

    def expert_map(self, rank: int) -> torch.Tensor:
        """``int32[E]`` on the CPU: global -> local id on ``rank``, -1 elsewhere."""
        if rank not in self._maps:
            table, local = [], 0
            for r in self.owner:
                table.append(local if r == rank else -1)
                local += r == rank
            self._maps[rank] = torch.tensor(table, dtype=torch.int32)
        return self._maps[rank]

    def owner_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``int32[E]``: the rank each global expert's tokens are sent to."""
        return torch.tensor(self.owner, dtype=torch.int32, device=device)

    def local_experts(self, rank: int, use_map: bool, device: torch.device | str = "cpu") -> LocalExperts:
        """This rank's view. ``use_map=False`` needs a contiguous placement (local ids by offset)."""
        e = self.global_num_experts
        if use_map:
            return LocalExperts(e, self.local_count(rank), self.expert_map(rank).to(device))
        if not self.is_contiguous():
            raise ContractError("running without an expert map needs a contiguous placement (each rank owns one "
                                "block of global ids); use an expert map for round-robin or custom placements")
        first = self.owner.index(rank) if rank in self.owner else 0
        return LocalExperts(e, self.local_count(rank), None, first)
