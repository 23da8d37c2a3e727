"""Property tests of the sentinel contract for every strategy across layouts (hypothesis).

Layouts: contiguous, round-robin, random non-uniform owners, replicated (every
expert local on the rank), E not divisible by ep_size, ep_size 1..64, with and
without an expert map (`hostcore.conformance.strategies.layouts`).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from moe_plugin_sentinel.strategies import STRATEGIES, Auto, GuardSlot, Negative, NonLocal, OutOfRange
from sentinel_testlib import assert_padding_skipped, padding_ids, preprocess_for

from hostcore.conformance.layouts import Layout, make_layout
from hostcore.conformance.strategies import layouts
from hostcore.contract import sentinel_verdict
from hostcore.errors import ContractError, UnsafeSentinelError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = st.sampled_from(sorted(STRATEGIES))
WITH_MAP = layouts(maps=(True,))
NO_MAP = layouts(kinds=("contiguous", "replicated"), maps=(False,))

EDGE_CASES = [
    make_layout("contiguous", 4, 2, 0, True),       # vLLM PR #42034's test: map [0, 1, -1, -1]
    make_layout("contiguous", 10, 4, 3, True),      # E not divisible by ep_size
    make_layout("contiguous", 10, 4, 3, False),
    make_layout("contiguous", 7, 64, 63, True),     # more ranks than experts: rank owns nothing
    make_layout("contiguous", 1, 1, 0, True),       # ep_size 1 with a map: every expert local
    make_layout("replicated", 12, 8, 5, True),      # replicated experts: no -1 in the map
    make_layout("round_robin", 9, 4, 0, True),      # last expert (8) local on rank 0: -1 wraps onto it
    make_layout("random", 6, 3, 1, True, [1, 1, 0, 2, 1, 1]),
]


def with_examples(test):
    """Always run the edge cases, for every strategy when the test takes ``name``."""
    takes_name = "name" in test.__code__.co_varnames[: test.__code__.co_argcount]
    for layout in EDGE_CASES:
        for name in (sorted(STRATEGIES) if takes_name else [None]):
            test = example(layout=layout, name=name)(test) if takes_name else example(layout=layout)(test)
    return test


@SETTINGS
@given(layout=layouts())
@with_examples
def test_auto_always_satisfies_the_contract(layout: Layout) -> None:
    local = layout.local()
    strategy = Auto()
    assert strategy.verdict(local).ok
    sentinel, chosen = strategy.choose(local)
    assert sentinel_verdict(sentinel, local.global_num_experts, chosen.expert_map).ok
    assert_padding_skipped(layout, sentinel, chosen)


@SETTINGS
@given(layout=layouts(), name=NAMES)
@with_examples
def test_verdict_agrees_with_the_contract_on_what_choose_returns(layout: Layout, name: str) -> None:
    local = layout.local()
    strategy = STRATEGIES[name](allow_unsafe=True)
    verdict = strategy.verdict(local)
    try:
        sentinel, chosen = strategy.choose(local)
    except UnsafeSentinelError as exc:  # only a strategy with nothing to offer raises under allow_unsafe
        assert name == "non_local" and not verdict.ok
        assert verdict.reason in str(exc)
        return
    contract = sentinel_verdict(sentinel, local.global_num_experts, chosen.expert_map)
    assert contract.ok == verdict.ok
    assert contract.reason in verdict.reason  # the contract's own words, plus the strategy's advice


@SETTINGS
@given(layout=layouts(), name=NAMES)
@with_examples
def test_safe_choose_holds_the_contract_or_raises_with_the_reason(layout: Layout, name: str) -> None:
    local = layout.local()
    strategy = STRATEGIES[name]()
    verdict = strategy.verdict(local)
    if verdict.ok:
        sentinel, chosen = strategy.choose(local)
        assert sentinel_verdict(sentinel, local.global_num_experts, chosen.expert_map).ok
        assert_padding_skipped(layout, sentinel, chosen)
        return
    with pytest.raises(UnsafeSentinelError) as info:
        strategy.choose(local)
    message = str(info.value)
    assert f"sentinel={name}" in message and verdict.reason in message and "sentinel=auto" in message
    assert "Expected" in message
    if strategy.candidate(local).sentinel is not None:
        assert f"sentinel={name}(allow_unsafe=true)" in message


@SETTINGS
@given(layout=WITH_MAP)
@with_examples
def test_negative_with_a_map_is_never_ok_and_misroutes_in_faithful_mode(layout: Layout) -> None:
    local = layout.local()
    if local.expert_map is None:
        return  # an edge-case example without a map; covered below
    verdict = Negative().verdict(local)
    assert not verdict.ok and "indexes before the expert map" in verdict.reason
    with pytest.raises(UnsafeSentinelError, match=r"sentinel=negative\(allow_unsafe=true\)"):
        Negative().choose(local)
    sentinel, chosen = Negative(allow_unsafe=True).choose(local)
    assert sentinel == -1 and chosen is local
    # The bug, reproduced: an unchecked lookup wraps -1 to the last map entry.
    wrapped = int(local.expert_map[-1])
    routing = preprocess_for(layout, chosen, "faithful").preprocess(padding_ids(-1))
    assert bool((routing.local_ids == wrapped).all())
    if wrapped >= 0:
        assert "padding is misrouted" in verdict.reason
        assert int(routing.expert_counts[wrapped]) == routing.local_ids.numel()
    with pytest.raises(ContractError, match="outside the expert map"):
        preprocess_for(layout, chosen, "checked").preprocess(padding_ids(-1))


@SETTINGS
@given(layout=NO_MAP)
def test_negative_without_a_map_is_never_ok(layout: Layout) -> None:
    local = layout.local()
    verdict = Negative().verdict(local)
    assert not verdict.ok and "is negative" in verdict.reason
    with pytest.raises(UnsafeSentinelError):
        Negative().choose(local)
    assert Negative(allow_unsafe=True).choose(local) == (-1, local)


@SETTINGS
@given(layout=WITH_MAP)
@with_examples
def test_out_of_range_with_a_plain_map_is_never_ok(layout: Layout) -> None:
    local = layout.local()
    if local.expert_map is None:
        return
    e = local.global_num_experts
    verdict = OutOfRange().verdict(local)
    assert not verdict.ok and "past the end of the expert map" in verdict.reason
    assert "with a map use non_local, guard_slot or auto" in verdict.reason
    with pytest.raises(UnsafeSentinelError, match=r"out_of_range\(allow_unsafe=true\)"):
        OutOfRange().choose(local)
    sentinel, chosen = OutOfRange(allow_unsafe=True).choose(local)
    assert sentinel == e and chosen is local
    routing = preprocess_for(layout, chosen, "safe").preprocess(padding_ids(sentinel))
    assert bool((routing.local_ids == -1).all()) and int(routing.invalid_count[0]) == routing.local_ids.numel()


@SETTINGS
@given(layout=NO_MAP)
def test_out_of_range_without_a_map_is_global_num_experts(layout: Layout) -> None:
    local = layout.local()
    assert OutOfRange().verdict(local).ok
    sentinel, chosen = OutOfRange().choose(local)
    assert sentinel == local.global_num_experts and chosen is local


@SETTINGS
@given(layout=layouts())
@with_examples
def test_guard_slot_always_holds_and_extends_the_map_once(layout: Layout) -> None:
    local = layout.local()
    e = local.global_num_experts
    assert GuardSlot().verdict(local).ok
    sentinel, chosen = GuardSlot().choose(local)
    assert sentinel == e
    assert_padding_skipped(layout, sentinel, chosen)
    if local.expert_map is None:
        assert chosen is local
        return
    table = chosen.expert_map
    assert table.dtype == local.expert_map.dtype and table.device == local.expert_map.device
    assert table.tolist() == local.expert_map.tolist() + [-1]
    assert (chosen.count, chosen.guard_slots) == (local.count, 1)
    again, rechosen = GuardSlot().choose(chosen)  # re-choosing (map unchanged) is idempotent
    assert again == e and rechosen.expert_map.tolist() == table.tolist()


@SETTINGS
@given(layout=layouts())
@with_examples
def test_non_local_is_the_first_minus_one_entry_or_not_applicable(layout: Layout) -> None:
    local = layout.local()
    verdict = NonLocal().verdict(local)
    if local.expert_map is None:
        assert not verdict.ok and "no expert map" in verdict.reason
        return
    minus_one = [g for g, v in enumerate(local.expert_map.tolist()) if v == -1]
    if minus_one:
        assert verdict.ok
        assert NonLocal().choose(local) == (minus_one[0], local)
        return
    assert not verdict.ok
    assert "every expert is local on this rank" in verdict.reason and "use guard_slot or auto" in verdict.reason
    for allow in (False, True):
        with pytest.raises(UnsafeSentinelError, match="allow_unsafe cannot help"):
            NonLocal(allow_unsafe=allow).choose(local)


@SETTINGS
@given(layout=layouts())
@with_examples
def test_auto_prefers_non_local_then_guard_slot_and_out_of_range_without_a_map(layout: Layout) -> None:
    local = layout.local()
    sentinel, chosen = Auto().choose(local)
    if local.expert_map is None:
        expected = OutOfRange().choose(local)
    elif NonLocal().verdict(local).ok:
        expected = NonLocal().choose(local)
    else:
        expected = GuardSlot().choose(local)
    assert sentinel == expected[0]
    assert (chosen.expert_map is None) == (expected[1].expert_map is None)
    if chosen.expert_map is not None:
        assert torch.equal(chosen.expert_map, expected[1].expert_map)


@SETTINGS
@given(layout=layouts(), name=NAMES)
@with_examples
def test_choose_is_deterministic_and_leaves_its_input_untouched(layout: Layout, name: str) -> None:
    local = layout.local()
    before = None if local.expert_map is None else local.expert_map.clone()
    strategy = STRATEGIES[name](allow_unsafe=True)
    outcomes = []
    for placement in (local, layout.local()):  # the same layout, a fresh but equal map
        try:
            s, chosen = strategy.choose(placement)
            outcomes.append((s, None if chosen.expert_map is None else chosen.expert_map.tolist()))
        except UnsafeSentinelError as exc:
            outcomes.append(("raised", str(exc)))
    assert outcomes[0] == outcomes[1]
    assert strategy.verdict(local) == strategy.verdict(layout.local())
    if before is not None:
        assert torch.equal(local.expert_map, before)


@SETTINGS
@given(layout=WITH_MAP, name=NAMES)
def test_on_a_guard_extended_map_verdicts_still_follow_the_contract(layout: Layout, name: str) -> None:
    """Re-choosing after guard_slot extended the map (e.g. a rebuild) goes through the same contract."""
    _, extended = GuardSlot().choose(layout.local())
    strategy = STRATEGIES[name](allow_unsafe=True)
    verdict = strategy.verdict(extended)
    cand = strategy.candidate(extended)
    if cand.sentinel is None:
        assert not verdict.ok
        return
    assert cand.local.guard_slots == 1  # never extended twice
    assert verdict.ok == sentinel_verdict(cand.sentinel, extended.global_num_experts, cand.local.expert_map).ok
    if name in ("out_of_range", "guard_slot", "auto", "non_local"):
        assert verdict.ok  # out_of_range now indexes the guard slot, a real -1 entry
