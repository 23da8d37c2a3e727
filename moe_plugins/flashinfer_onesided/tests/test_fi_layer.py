"""The plugin inside a whole `EPMoELayer` (fake FlashInfer, gloo ranks): exact output and a copy-free combine."""

from __future__ import annotations

import fi_testlib


def test_layer_forward_matches_the_dense_reference_and_combines_in_place() -> None:
    per_rank = fi_testlib.run_ranks(4, fi_testlib.scenario_layer)
    for rank, r in enumerate(per_rank):
        assert r["rel_err"] < 1e-6, (rank, r)
        assert r["in_workspace"] == [True], f"rank {rank}: the experts did not write into the combine workspace"
