"""Helpers shared by the sentinel plugin's tests: run real lookups on a chosen sentinel."""

from __future__ import annotations

import torch

from hostcore.backends.preprocess_torch import TorchPreprocess
from hostcore.conformance.layouts import Layout
from hostcore.hookspecs import BuildContext
from hostcore.placement import LocalExperts


def preprocess_for(layout: Layout, local: LocalExperts, mode: str) -> TorchPreprocess:
    """The host torch preprocess in ``mode`` for ``local`` (the placement a strategy returned)."""
    ctx = BuildContext(rank=layout.rank, ep_size=layout.ep_size, device=torch.device("cpu"), placement=layout.placement,
                       local=local, hidden_size=8, top_k=2, dtype=torch.float32, max_tokens_per_rank=4)
    return TorchPreprocess(ctx, mode=mode)


def padding_ids(sentinel: int, rows: int = 3, top_k: int = 2) -> torch.Tensor:
    """``int32 [rows, top_k]`` all equal to ``sentinel``: the ids of padding rows."""
    return torch.full((rows, top_k), sentinel, dtype=torch.int32)


def assert_padding_skipped(layout: Layout, sentinel: int, local: LocalExperts) -> None:
    """A valid sentinel is skipped by every lookup a kernel might do, and is never counted invalid.

    With a map: the unchecked lookup ``map[s]`` (torch indexing, what a faithful
    kernel reads) is -1, as is a bound-checked lookup; the host preprocess in all
    three modes returns -1 and safe mode counts nothing invalid. Without a map:
    ``s >= E`` and the preprocess skips it.
    """
    e = local.global_num_experts
    ids = padding_ids(sentinel)
    table = local.expert_map
    if table is None:
        assert sentinel >= e
    else:
        assert int(table[torch.tensor([sentinel])][0]) == -1  # faithful: unchecked indexing
        in_range = (ids >= 0) & (ids < table.numel())
        bounded = torch.where(in_range, table[ids.clamp(0, table.numel() - 1).long()], -1)
        assert bool((bounded == -1).all())
    for mode in ("safe", "checked", "faithful"):
        routing = preprocess_for(layout, local, mode).preprocess(ids)
        assert bool((routing.local_ids == -1).all()), (mode, routing.local_ids)
        assert int(routing.expert_counts.sum()) == 0
        if mode == "safe":
            assert routing.invalid_count is not None and int(routing.invalid_count[0]) == 0
