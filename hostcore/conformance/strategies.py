"""Hypothesis strategies for expert layouts (needs ``hypothesis``, in hostcore's ``test`` extra).

``layouts()`` draws the same parameters as `hostcore.conformance.layouts.random_layout`
but lets hypothesis shrink failures to the smallest layout (fewest experts and
ranks), and ``local_experts()`` maps them to a rank's `LocalExperts`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from ..placement import LocalExperts
from .layouts import KINDS, Layout, make_layout


@st.composite
def layouts(draw: st.DrawFn, kinds: Sequence[str] = KINDS, max_experts: int = 160, max_ep_size: int = 64,
            maps: Sequence[bool] = (True, False)) -> Layout:
    """A `Layout`; ``maps`` lists the allowed values of ``use_map``.

    Only contiguous placements can run without a map: for the others the layout
    gets a map even when ``maps`` is ``(False,)`` (pass ``kinds=("contiguous",)``
    for map-less layouts only).
    """
    kind = draw(st.sampled_from(list(kinds)))
    ep_size = draw(st.integers(1, max_ep_size))
    num_experts = draw(st.integers(1, max_experts))
    rank = draw(st.integers(0, ep_size - 1))
    owners = None
    if kind == "random":
        owners = draw(st.lists(st.integers(0, ep_size - 1), min_size=num_experts, max_size=num_experts))
    probe = make_layout(kind, num_experts, ep_size, rank, True, owners)
    allowed = [m for m in maps if m or probe.placement.is_contiguous()]
    use_map = draw(st.sampled_from(allowed)) if allowed else True
    return make_layout(kind, num_experts, ep_size, rank, use_map, owners)


def local_experts(**kwargs: object) -> st.SearchStrategy[LocalExperts]:
    """A rank's `LocalExperts` from `layouts` (same keyword arguments)."""
    return layouts(**kwargs).map(lambda layout: layout.local())  # type: ignore[arg-type]
