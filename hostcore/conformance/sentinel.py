"""`SentinelContract`: the contract tests of a sentinel strategy (stage ``sentinel``).

On ``cases`` random layouts (`hostcore.conformance.layouts`: contiguous,
round-robin, random owners, replicated; ``ep_size`` up to ``max_ep_size``; with
and without a map), seeded by ``--hostcore-seed``:

- the strategy's ``verdict`` agrees with `sentinel_verdict` on what ``choose``
  returns (the map after any extension); when ``choose`` raises, it raises
  `UnsafeSentinelError` and the verdict says not ok, with a reason;
- built without ``allow_unsafe``, every sentinel ``choose`` returns satisfies
  the contract, and real lookups skip it (``map[s] == -1`` by plain torch
  indexing, a bound-checked lookup gives -1; without a map ``s >= E``);
- the returned placement keeps the rank's experts (same local ids, map prefix
  unchanged, only trailing -1 guard slots added, same device and dtype);
- ``choose`` and ``verdict`` are deterministic and leave their input untouched.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..contract import Stage, Verdict, sentinel_verdict
from ..errors import UnsafeSentinelError
from ..hookspecs import BuildContext, SentinelStrategy
from ..placement import LocalExperts
from .base import ContractBase
from .checks import expect
from .layouts import KINDS, Layout, random_layout


def _context(layout: Layout, local: LocalExperts) -> BuildContext:
    return BuildContext(rank=layout.rank, ep_size=layout.ep_size, device=torch.device("cpu"), placement=layout.placement,
                        local=local, hidden_size=8, top_k=1, dtype=torch.float32, max_tokens_per_rank=1)


def _map_list(local: LocalExperts) -> list[int] | None:
    return None if local.expert_map is None else local.expert_map.tolist()


class SentinelContract(ContractBase):
    """Subclass with ``backend = "<name>"`` (and ``options``) to run the sentinel contract tests."""

    stage: ClassVar[Stage] = Stage.SENTINEL
    cases: ClassVar[int] = 300
    layout_kinds: ClassVar[tuple[str, ...]] = KINDS
    max_experts: ClassVar[int] = 160
    max_ep_size: ClassVar[int] = 64

    def layouts(self) -> list[Layout]:
        rng = self.rng("layouts")
        return [random_layout(rng, self.layout_kinds, self.max_experts, self.max_ep_size) for _ in range(self.cases)]

    def strategy(self, layout: Layout, safe: bool = False) -> Any:
        """The strategy under test; ``safe=True`` forces ``allow_unsafe=False`` when the backend declares it."""
        overrides = {"allow_unsafe": False} if safe and "allow_unsafe" in self.spec.options else {}
        return self.build(_context(layout, layout.local()), **overrides)

    def _outcome(self, strategy: Any, local: LocalExperts) -> tuple[Verdict, tuple[int, LocalExperts] | UnsafeSentinelError]:
        verdict = strategy.verdict(local)
        expect(isinstance(verdict, Verdict), f"verdict() must return hostcore.contract.Verdict, got {verdict!r}")
        try:
            return verdict, strategy.choose(local)
        except UnsafeSentinelError as exc:
            return verdict, exc

    def test_is_a_sentinel_strategy(self) -> None:
        layout = self.layouts()[0]
        strategy = self.strategy(layout)
        expect(isinstance(strategy, SentinelStrategy), f"{strategy!r} lacks name/verdict/choose of SentinelStrategy")
        expect(isinstance(strategy.name, str) and strategy.name != "", f"strategy.name must be a non-empty str, got "
                                                                        f"{strategy.name!r}")

    def test_verdict_agrees_with_the_contract_on_what_choose_returns(self) -> None:
        for i, layout in enumerate(self.layouts()):
            where = self.where(f"case {i}: {layout}")
            local = layout.local()
            verdict, outcome = self._outcome(self.strategy(layout), local)
            if isinstance(outcome, UnsafeSentinelError):
                expect(not verdict.ok, f"choose raised {outcome!r} but verdict said ok: {verdict.reason}{where}")
                expect(bool(verdict.reason) and bool(str(outcome)), f"refusals must say why{where}")
                continue
            sentinel, chosen = outcome
            expect(isinstance(sentinel, int) and not isinstance(sentinel, bool),
                   f"choose must return an int sentinel, got {sentinel!r}{where}")
            contract = sentinel_verdict(sentinel, local.global_num_experts, chosen.expert_map)
            expect(contract.ok == verdict.ok, f"verdict says ok={verdict.ok} ({verdict.reason}) but the contract on the "
                                              f"returned sentinel {sentinel} says ok={contract.ok} ({contract.reason}){where}")
            expect(bool(verdict.reason), f"verdict.reason is empty{where}")

    def test_safe_choice_holds_the_contract(self) -> None:
        for i, layout in enumerate(self.layouts()):
            where = self.where(f"case {i}: {layout}")
            local = layout.local()
            verdict, outcome = self._outcome(self.strategy(layout, safe=True), local)
            if isinstance(outcome, UnsafeSentinelError):
                expect(not verdict.ok, f"choose refused a layout its verdict accepts: {outcome}{where}")
                continue
            sentinel, chosen = outcome
            contract = sentinel_verdict(sentinel, local.global_num_experts, chosen.expert_map)
            expect(contract.ok, f"choose returned sentinel {sentinel} without allow_unsafe, but it breaks the "
                                f"contract: {contract.reason}{where}")
            table = chosen.expert_map
            if table is None:
                expect(sentinel >= local.global_num_experts, f"sentinel {sentinel} < E without a map{where}")
                continue
            faithful = int(table[torch.tensor([sentinel], device=table.device)][0])
            expect(faithful == -1, f"expert_map[{sentinel}] = {faithful} by plain indexing, expected -1{where}")
            inside = 0 <= sentinel < table.numel()
            expect(inside and int(table[sentinel]) == -1, f"a bound-checked lookup of {sentinel} does not skip it{where}")

    def test_returned_placement_keeps_the_experts(self) -> None:
        for i, layout in enumerate(self.layouts()):
            where = self.where(f"case {i}: {layout}")
            local = layout.local()
            _, outcome = self._outcome(self.strategy(layout), local)
            if isinstance(outcome, UnsafeSentinelError):
                continue
            _, chosen = outcome
            expect(isinstance(chosen, LocalExperts), f"choose must return a LocalExperts, got {chosen!r}{where}")
            expect((chosen.global_num_experts, chosen.count) == (local.global_num_experts, local.count),
                   f"placement changed: E/count {chosen.global_num_experts}/{chosen.count}, expected "
                   f"{local.global_num_experts}/{local.count}{where}")
            expect(chosen.global_ids() == local.global_ids(), f"local experts changed{where}")
            if local.expert_map is None:
                expect(chosen.expert_map is None and chosen.first == local.first,
                       f"a placement without a map must stay without one (first={local.first}){where}")
                continue
            table, before = chosen.expert_map, local.expert_map
            expect(table is not None and table.dtype == before.dtype and table.device == before.device,
                   f"the returned map must stay {before.dtype} on {before.device}{where}")
            n = before.numel()
            expect(table[:n].tolist() == before.tolist() and all(v == -1 for v in table[n:].tolist()),
                   f"the returned map must be the input map plus trailing -1 guard slots, got {table.tolist()}{where}")

    def test_choose_is_deterministic_and_leaves_its_input_untouched(self) -> None:
        for i, layout in enumerate(self.layouts()):
            where = self.where(f"case {i}: {layout}")
            strategy = self.strategy(layout)
            local = layout.local()
            before = _map_list(local)
            runs = []
            for placement in (local, local, layout.local()):
                verdict, outcome = self._outcome(strategy, placement)
                result = (("raised", str(outcome)) if isinstance(outcome, UnsafeSentinelError)
                          else (outcome[0], _map_list(outcome[1])))
                runs.append((verdict, result))
            expect(runs[0] == runs[1] == runs[2], f"verdict/choose differ between calls on the same layout: {runs}{where}")
            expect(_map_list(local) == before, f"choose modified the input expert map{where}")
