"""Concrete examples of each sentinel strategy, including the cases of vLLM PR #42034."""

from __future__ import annotations

import pytest
import torch
from moe_plugin_sentinel.strategies import STRATEGIES, Auto, GuardSlot, Negative, NonLocal, OutOfRange

from hostcore.contract import Verdict
from hostcore.errors import UnsafeSentinelError
from hostcore.hookspecs import SentinelStrategy
from hostcore.placement import ExpertPlacement, LocalExperts


def rank0_of_2() -> LocalExperts:
    """The PR's test layout: 4 experts, rank 0 of 2 owns 0 and 1: map [0, 1, -1, -1]."""
    return ExpertPlacement.contiguous(4, 2).local_experts(0, use_map=True)


def every_expert_local() -> LocalExperts:
    return ExpertPlacement.contiguous(4, 1).local_experts(0, use_map=True)


def test_every_strategy_implements_the_protocol() -> None:
    for cls in STRATEGIES.values():
        strategy = cls()
        assert isinstance(strategy, SentinelStrategy)
        assert strategy.name == cls.name
        assert isinstance(strategy.verdict(rank0_of_2()), Verdict)
    assert list(STRATEGIES) == ["negative", "out_of_range", "non_local", "guard_slot", "auto"]


def test_non_local_reproduces_the_fix_of_vllm_pr_42034() -> None:
    local = rank0_of_2()
    assert NonLocal().choose(local) == (2, local)
    assert Auto().choose(local) == (2, local)
    assert "expert_map[2] = -1" in NonLocal().verdict(local).reason


def test_negative_on_the_pr_layout_is_refused_with_what_to_do() -> None:
    with pytest.raises(UnsafeSentinelError) as info:
        Negative().choose(rank0_of_2())
    message = str(info.value)
    assert message.startswith("sentinel=negative gives -1, which breaks the sentinel contract on this rank")
    assert "E=4, expert map int32[4] with 2 local experts" in message
    assert "indexes before the expert map" in message
    assert "expert_map[s] == -1" in message  # what was expected
    assert "Use sentinel=auto" in message and "sentinel=negative(allow_unsafe=true)" in message


def test_negative_misroutes_when_the_last_expert_is_local() -> None:
    local = every_expert_local()
    verdict = Negative().verdict(local)
    assert not verdict.ok
    assert "torch wraps it to expert_map[3] = 3, local expert 3: padding is misrouted" in verdict.reason
    assert Negative(allow_unsafe=True).choose(local) == (-1, local)


def test_replicated_experts_need_a_guard_slot() -> None:
    local = every_expert_local()
    verdict = NonLocal().verdict(local)
    assert not verdict.ok
    assert verdict.reason == ("non_local: every expert is local on this rank (ep_size 1 with a map, or replicated "
                              "experts): no non-local id exists; use guard_slot or auto")
    for cls in (GuardSlot, Auto):
        sentinel, chosen = cls().choose(local)
        assert sentinel == 4
        assert chosen.expert_map.tolist() == [0, 1, 2, 3, -1]
        assert chosen.expert_map.dtype == torch.int32
        assert local.expert_map.tolist() == [0, 1, 2, 3]  # the input placement is left alone
    assert Auto().verdict(local).reason.startswith("auto (as guard_slot): sentinel 4: expert_map[4] = -1")


def test_out_of_range_is_e_and_only_valid_without_a_map() -> None:
    no_map = ExpertPlacement.contiguous(10, 4).local_experts(3, use_map=False)
    assert OutOfRange().choose(no_map) == (10, no_map)
    assert Auto().choose(no_map) == (10, no_map)
    assert GuardSlot().choose(no_map) == (10, no_map)
    with_map = ExpertPlacement.contiguous(10, 4).local_experts(3, use_map=True)
    with pytest.raises(UnsafeSentinelError, match=r"10 is past the end of the expert map int32\[10\]"):
        OutOfRange().choose(with_map)


def test_non_local_without_a_map_has_nothing_to_offer() -> None:
    no_map = ExpertPlacement.contiguous(8, 2).local_experts(0, use_map=False)
    with pytest.raises(UnsafeSentinelError, match="allow_unsafe cannot help") as info:
        NonLocal(allow_unsafe=True).choose(no_map)
    assert "no expert map" in str(info.value) and "Use sentinel=auto" in str(info.value)


def test_round_robin_first_non_local() -> None:
    local = ExpertPlacement.round_robin(8, 4).local_experts(0, use_map=True)  # owns 0 and 4
    assert local.expert_map.tolist() == [0, -1, -1, -1, 1, -1, -1, -1]
    assert NonLocal().choose(local)[0] == 1
    local3 = ExpertPlacement.round_robin(8, 4).local_experts(3, use_map=True)  # owns 3 and 7
    assert NonLocal().choose(local3)[0] == 0
    # -1 would wrap to expert_map[7] = 1 on rank 3: local expert 1 computes the padding.
    assert "local expert 1: padding is misrouted" in Negative().verdict(local3).reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_guard_slot_keeps_the_map_on_its_device() -> None:
    local = every_expert_local()
    local = local.with_map(local.expert_map.cuda())
    _, chosen = GuardSlot().choose(local)
    assert chosen.expert_map.device == local.expert_map.device and chosen.expert_map.dtype == torch.int32
