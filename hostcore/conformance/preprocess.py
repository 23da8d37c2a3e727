"""`PreprocessContract`: the contract tests of a preprocess backend (stage ``preprocess``).

Each case draws a layout (``layout_kinds``, ``ep_size`` 1..``max_ep_size``, with
and without a map), a rank, uneven rows per source rank (some ranks send
nothing) and fresh random global ids (int32) whose padding rows carry a valid
sentinel; every standard valid sentinel of the layout is tried
(`hostcore.conformance.layouts.valid_sentinels`: ``non_local``, ``guard_slot``
with its extended map, ``out_of_range`` without a map). The backend, built with
``options`` (which must select its safe behaviour), must:

- return ``local_ids`` and ``expert_counts`` equal to the host ``torch``
  preprocess in safe mode (and to the contract's lookup, computed independently);
- for each ``block_ms`` value, return a valid `AlignedLayout` (`check_aligned_layout`);
- skip ids outside the map (-1) and, when it counts, count them exactly;
- leave its input untouched, and handle zero rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..contract import LocalRouting, Stage
from ..hookspecs import BuildContext
from .base import ContractBase
from .checks import check_aligned_layout, check_expert_counts, expect
from .data import expected_local_ids, inject_invalid, padding_mask, received_ids
from .layouts import Layout, PaddingSentinel, random_layout, valid_sentinels


@dataclass(frozen=True)
class PreprocessCase:
    """One generated input: the layout, the sentinel in use and the received ids ``[ep_size * R, K]`` (CPU)."""

    layout: Layout
    padding: PaddingSentinel
    rows_per_source: tuple[int, ...]
    rows_per_rank: int
    ids: torch.Tensor

    def __str__(self) -> str:
        return (f"{self.layout}, sentinel {self.padding.sentinel} ({self.padding.how}), rows per source "
                f"{list(self.rows_per_source)} of R={self.rows_per_rank}, K={self.ids.shape[1]}")


class PreprocessContract(ContractBase):
    """Subclass with ``backend = "<name>"`` (``options``, ``device``) to run the preprocess contract tests."""

    stage: ClassVar[Stage] = Stage.PREPROCESS
    cases: ClassVar[int] = 24
    layout_kinds: ClassVar[tuple[str, ...]] = ("contiguous", "round_robin", "random", "replicated")
    max_experts: ClassVar[int] = 64
    max_ep_size: ClassVar[int] = 8
    max_rows_per_rank: ClassVar[int] = 24
    max_top_k: ClassVar[int] = 8
    block_ms: ClassVar[tuple[int, ...]] = (8, 16, 48, 64)

    def generate(self) -> list[PreprocessCase]:
        """``cases`` layouts, each with every valid sentinel: the inputs of the tests below."""
        rng = self.rng("cases")
        out = []
        for _ in range(self.cases):
            layout = random_layout(rng, self.layout_kinds, self.max_experts, self.max_ep_size)
            top_k = rng.randint(1, min(self.max_top_k, layout.global_num_experts))
            r = rng.randint(1, self.max_rows_per_rank)
            rows = tuple(rng.choice([0, rng.randint(0, r), r]) for _ in range(layout.ep_size))
            for padding in valid_sentinels(layout.local()):
                gen = self.torch_gen(rng)
                ids = received_ids(gen, rows, r, top_k, layout.global_num_experts, padding.sentinel)
                out.append(PreprocessCase(layout, padding, rows, r, ids))
        return out

    def context(self, case: PreprocessCase) -> BuildContext:
        layout = case.layout
        return BuildContext(rank=layout.rank, ep_size=layout.ep_size, device=torch.device(self.device),
                            placement=layout.placement, local=case.padding.local, hidden_size=64,
                            top_k=int(case.ids.shape[1]), dtype=torch.bfloat16, max_tokens_per_rank=case.rows_per_rank,
                            sentinel=case.padding.sentinel)

    def run_both(self, case: PreprocessCase, ids: torch.Tensor, block_m: int | None = None,
                 ) -> tuple[LocalRouting, LocalRouting]:
        """The backend's and the host ``torch`` (safe) preprocess's routing of ``ids``."""
        ctx = self.context(case)
        backend: Any = self.build(ctx)
        host: Any = self.build_host(Stage.PREPROCESS, "torch", ctx, mode="safe")
        device_ids = ids.to(self.device)
        got = backend.preprocess(device_ids, block_m)
        expect(isinstance(got, LocalRouting), f"preprocess must return hostcore.contract.LocalRouting, got {got!r}")
        return got, host.preprocess(ids.to(self.device), block_m)

    def compare(self, got: LocalRouting, ref: LocalRouting, where: str) -> None:
        expect(got.local_ids.device.type == torch.device(self.device).type,
               f"local_ids on {got.local_ids.device}, expected {self.device}{where}")
        expect(tuple(got.local_ids.shape) == tuple(ref.local_ids.shape),
               f"local_ids shape {tuple(got.local_ids.shape)}, expected {tuple(ref.local_ids.shape)}{where}")
        check_expert_counts(got)
        a, b = got.local_ids.to("cpu"), ref.local_ids.to("cpu")
        if not torch.equal(a, b):
            pos = (a != b).nonzero()[:6].tolist()
            shown = ", ".join(f"[{n}, {k}]: {int(a[n, k])} vs {int(b[n, k])}" for n, k in pos)
            raise AssertionError(f"local_ids differ from the host torch preprocess at {shown}{where}")
        expect(torch.equal(got.expert_counts.to("cpu"), ref.expert_counts.to("cpu")),
               f"expert_counts {got.expert_counts.tolist()} != host {ref.expert_counts.tolist()}{where}")

    def test_local_ids_and_counts_match_the_host_preprocess(self) -> None:
        for i, case in enumerate(self.generate()):
            where = self.where(f"case {i}: {case}")
            got, ref = self.run_both(case, case.ids)
            self.compare(got, ref, where)
            expected, _ = expected_local_ids(case.ids, case.padding.local)
            expect(torch.equal(got.local_ids.to("cpu"), expected), f"local_ids differ from the contract's lookup{where}")
            pad = padding_mask(case.rows_per_source, case.rows_per_rank)
            expect(bool((got.local_ids.to("cpu")[pad] == -1).all()), f"a padding row got a local id{where}")
            if got.invalid_count is not None:
                expect(int(got.invalid_count.reshape(-1)[0]) == 0,
                       f"invalid_count = {int(got.invalid_count.reshape(-1)[0])} on input without invalid ids "
                       f"(the sentinel must not count as invalid){where}")

    def test_aligned_layout_is_valid(self) -> None:
        for i, case in enumerate(self.generate()):
            for block_m in self.block_ms:
                where = self.where(f"case {i}, block_m={block_m}: {case}")
                got, ref = self.run_both(case, case.ids, block_m)
                self.compare(got, ref, where)
                try:
                    check_aligned_layout(got, block_m)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}{where}") from None

    def test_invalid_ids_are_skipped_and_counted(self) -> None:
        for i, case in enumerate(self.generate()):
            where = self.where(f"case {i}: {case}")
            rng = self.rng("invalid", i)
            pad = padding_mask(case.rows_per_source, case.rows_per_rank)
            ids, mask = inject_invalid(self.torch_gen(rng), case.ids, pad, case.padding.local, rng.randint(1, 6))
            got, ref = self.run_both(case, ids, self.block_ms[0] if self.block_ms else None)
            self.compare(got, ref, where)
            expect(bool((got.local_ids.to("cpu")[mask] == -1).all()), f"an invalid id got a local id{where}")
            _, invalid = expected_local_ids(ids, case.padding.local)
            if got.invalid_count is not None:
                counted = int(got.invalid_count.reshape(-1)[0])
                expect(counted == invalid, f"invalid_count = {counted}, expected {invalid} "
                                           f"(ids {ids[mask].tolist()}){where}")
            if got.aligned is not None:
                check_aligned_layout(got, got.aligned.block_m)

    def test_leaves_its_input_untouched(self) -> None:
        case = self.generate()[0]
        ids = case.ids.to(self.device)
        before = ids.clone()
        backend: Any = self.build(self.context(case))
        backend.preprocess(ids, self.block_ms[0] if self.block_ms else None)
        expect(torch.equal(ids, before), f"preprocess modified its topk_ids input{self.where(str(case))}")

    def test_zero_rows(self) -> None:
        case = self.generate()[0]
        empty = case.ids[:0]
        for block_m in (None, *self.block_ms):
            where = self.where(f"0 rows, block_m={block_m}: {case}")
            got, ref = self.run_both(case, empty, block_m)
            self.compare(got, ref, where)
            if block_m is not None:
                check_aligned_layout(got, block_m)
