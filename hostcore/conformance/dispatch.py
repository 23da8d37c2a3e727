"""`DispatchContract`: the contract tests of a dispatch backend (stage ``dispatch``, with its combine).

For each ``ep_size`` in ``ep_sizes`` it spawns that many processes
(``torch.multiprocessing`` spawn, ``dist_backend`` over a free localhost port),
builds the backend on each through the registry (sentinel by ``auto``
semantics: with a map the first -1 entry, else a guard slot; ``E`` without a
map) and runs the scenarios of `hostcore.conformance.dispatch_worker`: uneven
token counts including a rank with 0 tokens and a round where every rank has
none, ``rows_per_rank`` passed and agreed, ``placements`` with and without a
map. One spawn per ``ep_size`` serves all four tests, which check:

- layout: the received tensors follow the contract (`hostcore.contract.check_received`:
  shapes, dtypes, padding rows carry the sentinel, real ids in ``[0, E)``), ``R`` is
  the one passed, ``rows_per_source`` (when given) is right;
- tokens: each token reaches each rank owning one of its experts exactly once,
  unaltered, and no other rank;
- combine: with rank ``d`` returning its real rows times ``2**d`` (zeros in
  padding), combine gives each token its hidden state times the sum over its
  ranks, exactly (fp32 accumulation, one rounding);
- phase: a second dispatch without combine raises.

The backend must be installed (the spawned processes discover it), or named by
``plugin``. Every test should finish in seconds: a hung collective ends after
``timeout_s``.
"""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.multiprocessing as mp

from ..contract import Stage
from .base import ContractBase
from .dispatch_worker import CHECKS, DispatchSpec, run_rank

_RESULTS: dict[DispatchSpec, dict[str, list[str]] | str] = {}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_suite(spec: DispatchSpec) -> dict[str, list[str]] | str:
    """Failures per check (``rank r: ...`` lines) for ``spec``, or the error that stopped the run; cached."""
    if spec not in _RESULTS:
        with tempfile.TemporaryDirectory(prefix="hostcore-dispatch-") as outdir:
            try:
                mp.spawn(run_rank, args=(spec, free_port(), outdir), nprocs=spec.ep_size, join=True,
                         start_method="spawn")
            except Exception as exc:  # noqa: BLE001 - a rank raised or died: report it for every check
                _RESULTS[spec] = f"a spawned rank failed: {exc}"
                return _RESULTS[spec]
            merged: dict[str, list[str]] = {check: [] for check in CHECKS}
            for rank in range(spec.ep_size):
                path = Path(outdir, f"rank{rank}.json")
                if not path.exists():
                    _RESULTS[spec] = f"rank {rank} exited without writing its results"
                    return _RESULTS[spec]
                for check, lines in json.loads(path.read_text()).items():
                    merged[check] += lines
            _RESULTS[spec] = merged
    return _RESULTS[spec]


class DispatchContract(ContractBase):
    """Subclass with ``backend = "<name>"`` (``options``, ``device``, ``ep_sizes``, ``dist_backend``...)."""

    stage: ClassVar[Stage] = Stage.DISPATCH
    ep_sizes: ClassVar[tuple[int, ...]] = (1, 2)
    dist_backend: ClassVar[str] = "gloo"
    dtype: ClassVar[torch.dtype] = torch.bfloat16
    hidden_size: ClassVar[int] = 64
    top_k: ClassVar[int] = 3
    placements: ClassVar[tuple[str, ...]] = ("contiguous", "round_robin")
    timeout_s: ClassVar[float] = 60.0

    def num_experts(self, ep_size: int) -> int:
        """Global experts for ``ep_size`` ranks; default ``3 * ep_size + 1`` (not divisible by ``ep_size`` > 1)."""
        return 3 * ep_size + 1

    def dispatch_spec(self, ep_size: int) -> DispatchSpec:
        cls = type(self)
        if torch.device(cls.device).type == "cuda" and torch.cuda.device_count() < ep_size:
            pytest.skip(f"ep_size {ep_size} on {cls.device} needs {ep_size} GPUs, found {torch.cuda.device_count()}")
        return DispatchSpec(backend=str(cls.backend), options=tuple(sorted(dict(cls.options).items())), plugin=cls.plugin,
                            device=cls.device, ep_size=ep_size, dist_backend=cls.dist_backend, seed=self.seed,
                            dtype=str(cls.dtype).replace("torch.", ""), hidden_size=cls.hidden_size, top_k=cls.top_k,
                            num_experts=self.num_experts(ep_size), placements=tuple(cls.placements),
                            timeout_s=cls.timeout_s)

    def report(self, ep_size: int, check: str) -> None:
        outcome = run_suite(self.dispatch_spec(ep_size))
        where = self.where(f"ep_size {ep_size}")
        if isinstance(outcome, str):
            raise AssertionError(f"{outcome}{where}")
        if outcome[check]:
            raise AssertionError("\n".join(outcome[check][:12]) + where)

    def test_received_layout_follows_the_contract(self, hostcore_ep_size: int) -> None:
        self.report(hostcore_ep_size, "layout")

    def test_each_token_reaches_each_owner_rank_once(self, hostcore_ep_size: int) -> None:
        self.report(hostcore_ep_size, "tokens")

    def test_combine_sums_the_rows_of_each_token(self, hostcore_ep_size: int) -> None:
        self.report(hostcore_ep_size, "combine")

    def test_dispatch_twice_without_combine_is_an_error(self, hostcore_ep_size: int) -> None:
        self.report(hostcore_ep_size, "phase")
