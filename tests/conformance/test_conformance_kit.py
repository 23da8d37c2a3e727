"""The conformance kit catches broken backends (one known bug each, `broken_backends`), and its
checker and pytest plugin behave as documented."""

from __future__ import annotations

import pytest
import torch

from hostcore import Registry
from hostcore.backends.preprocess_torch import TorchPreprocess
from hostcore.conformance import (
    DispatchContract,
    ExpertsContract,
    PreprocessContract,
    SentinelContract,
    check_aligned_layout,
)
from hostcore.conformance.base import ContractBase
from hostcore.contract import AlignedLayout, LocalRouting
from hostcore.hookspecs import BuildContext
from hostcore.placement import ExpertPlacement

PLUGIN = "conformance.broken_backends"  # tests/ is on the pytest pythonpath


def contract(base: type[ContractBase], backend: str, **attrs: object) -> ContractBase:
    """An instance of ``base`` for ``backend`` from the broken plugin, set up as the kit's fixture does."""
    cls = type(f"Kit_{backend}", (base,), {"backend": backend, "plugin": PLUGIN, **attrs})
    inst = cls()
    inst.setup_backend(Registry.discover(), 0, f"selftest_{backend}")
    return inst


def fails(inst: ContractBase, test: str, *fragments: str, **kwargs: object) -> str:
    """Run ``test`` and expect the kit to fail it with every fragment in the message."""
    with pytest.raises(AssertionError) as info:
        getattr(inst, test)(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "--hostcore-seed 0" in message  # every failure says how to reproduce it
    return message


# --- sentinel -----------------------------------------------------------------------------------

def test_sentinel_kit_catches_a_verdict_that_lies() -> None:
    inst = contract(SentinelContract, "broken_lying_negative", cases=20)
    fails(inst, "test_verdict_agrees_with_the_contract_on_what_choose_returns", "verdict says ok=True (trust me)",
          "returned sentinel -1 says ok=False")
    fails(inst, "test_safe_choice_holds_the_contract", "returned sentinel -1 without allow_unsafe")


def test_sentinel_kit_catches_a_choice_that_should_have_been_refused() -> None:
    inst = contract(SentinelContract, "broken_no_guard", cases=20, layout_kinds=("round_robin",))
    inst.test_verdict_agrees_with_the_contract_on_what_choose_returns()  # honest verdict: agrees
    fails(inst, "test_safe_choice_holds_the_contract", "past the end of the expert map")


def test_sentinel_kit_catches_nondeterminism() -> None:
    inst = contract(SentinelContract, "broken_fickle", cases=20)
    inst.test_safe_choice_holds_the_contract()  # every pick is valid...
    fails(inst, "test_choose_is_deterministic_and_leaves_its_input_untouched", "differ between calls")


# --- preprocess ---------------------------------------------------------------------------------

def test_preprocess_kit_catches_wrapping_negative_ids() -> None:
    inst = contract(PreprocessContract, "broken_wrapping", layout_kinds=("round_robin",), cases=8)
    inst.test_local_ids_and_counts_match_the_host_preprocess()  # valid sentinels alone do not expose it
    message = fails(inst, "test_invalid_ids_are_skipped_and_counted")
    # Caught by the wrapped local id, or (when the wrap lands on a -1 entry) by the missing count.
    assert "local_ids differ from the host torch preprocess" in message or "invalid_count = " in message, message


def test_preprocess_kit_catches_bad_group_padding() -> None:
    inst = contract(PreprocessContract, "broken_bad_padding", cases=6)
    fails(inst, "test_aligned_layout_is_valid", "must be padded with N*K")


def test_preprocess_kit_catches_a_sentinel_counted_as_invalid() -> None:
    inst = contract(PreprocessContract, "broken_counts_sentinel", cases=6)
    fails(inst, "test_local_ids_and_counts_match_the_host_preprocess", "the sentinel must not count as invalid")


# --- experts ------------------------------------------------------------------------------------

def test_experts_kit_catches_computed_padding_rows() -> None:
    inst = contract(ExpertsContract, "broken_padding", cases=1)
    fails(inst, "test_matches_the_float64_reference", "rows without a local slot must be exactly 0",
          hostcore_dtype=torch.float32, hostcore_shape=(256, 128, 128))


def test_experts_kit_catches_missing_router_weights() -> None:
    inst = contract(ExpertsContract, "broken_unweighted", cases=1)
    fails(inst, "test_matches_the_float64_reference", "relative Frobenius error",
          hostcore_dtype=torch.bfloat16, hostcore_shape=(256, 256, None))


def test_unavailable_backend_is_skipped_with_its_reason() -> None:
    with pytest.raises(pytest.skip.Exception, match="cannot run here: needs a flux capacitor"):
        contract(ExpertsContract, "broken_unavailable")


def test_unknown_backend_fails_listing_the_installed_ones() -> None:
    with pytest.raises(pytest.fail.Exception, match="(?s)unknown experts backend 'torhc'.*Did you mean 'torch'"):
        contract(ExpertsContract, "torhc")


# --- dispatch (spawned ranks; the broken module is imported there through `plugin`) -----------

def test_dispatch_kit_catches_minus_one_padding() -> None:
    inst = contract(DispatchContract, "broken_minus_one", ep_sizes=(1,))  # one spawned rank keeps it quick
    fails(inst, "test_received_layout_follows_the_contract", "padding row", "expected all", hostcore_ep_size=1)
    inst.test_combine_sums_the_rows_of_each_token(hostcore_ep_size=1)  # the rest still works


def test_dispatch_kit_catches_a_wrong_combine() -> None:
    inst = contract(DispatchContract, "broken_doubling", ep_sizes=(1,))
    inst.test_received_layout_follows_the_contract(hostcore_ep_size=1)
    inst.test_each_token_reaches_each_owner_rank_once(hostcore_ep_size=1)
    fails(inst, "test_combine_sums_the_rows_of_each_token", "combine wrong for tokens", hostcore_ep_size=1)


# --- check_aligned_layout on hand-corrupted layouts ---------------------------------------------

def _routing(block_m: int = 4) -> LocalRouting:
    placement = ExpertPlacement.contiguous(8, 2)
    local = placement.local_experts(0, use_map=True)
    ctx = BuildContext(rank=0, ep_size=2, device=torch.device("cpu"), placement=placement, local=local,
                       hidden_size=8, top_k=2, dtype=torch.float32, max_tokens_per_rank=4, sentinel=4)
    ids = torch.tensor([[0, 1], [3, 5], [1, 2], [4, 4], [0, 3]], dtype=torch.int32)
    return TorchPreprocess(ctx).preprocess(ids, block_m)


def _with(routing: LocalRouting, **changes: torch.Tensor) -> LocalRouting:
    a = routing.aligned
    fields = {"sorted_slot_ids": a.sorted_slot_ids, "block_expert_ids": a.block_expert_ids,
              "num_slots_post_padded": a.num_slots_post_padded, **changes}
    return LocalRouting(routing.local_ids, routing.expert_counts, routing.invalid_count, AlignedLayout(**fields, block_m=a.block_m))


def test_check_aligned_layout_accepts_the_host_layout() -> None:
    for block_m in (1, 2, 4, 16):
        check_aligned_layout(_routing(block_m), block_m)


def test_check_aligned_layout_names_each_corruption() -> None:
    routing = _routing(4)
    a = routing.aligned
    # expert 0 has slots 0 and 8 (ids [0,1],[0,3]); expert 1 has 1 and 4; expert 2 has 5; expert 3 has 3 and 9.
    assert a.sorted_slot_ids[:4].tolist() == [0, 8, 10, 10]
    swapped = a.sorted_slot_ids.clone()
    swapped[0], swapped[4] = swapped[4].clone(), swapped[0].clone()
    cases = {
        "holds slots": _with(routing, sorted_slot_ids=swapped),
        "num_slots_post_padded = 12": _with(routing, num_slots_post_padded=torch.tensor([12], dtype=torch.int32)),
        "expected 1 (blocks of local expert 1)": _with(routing, block_expert_ids=torch.where(
            a.block_expert_ids == 1, 2, a.block_expert_ids).to(torch.int32)),
        "past the used blocks": _with(routing, block_expert_ids=torch.where(
            a.block_expert_ids == -1, 0, a.block_expert_ids).to(torch.int32)),
        "below the static bound": _with(routing, sorted_slot_ids=a.sorted_slot_ids[:16],
                                        block_expert_ids=a.block_expert_ids[:4]),
        "must be a 1-D int32": _with(routing, sorted_slot_ids=a.sorted_slot_ids.long()),
    }
    for fragment, broken in cases.items():
        with pytest.raises(AssertionError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            check_aligned_layout(broken, 4)
    with pytest.raises(AssertionError, match="aligned.block_m is 4, expected the requested 8"):
        check_aligned_layout(routing, 8)
    with pytest.raises(AssertionError, match="returned no aligned layout"):
        check_aligned_layout(_routing_without_layout(), 4)


def _routing_without_layout() -> LocalRouting:
    r = _routing(4)
    return LocalRouting(r.local_ids, r.expert_counts, r.invalid_count, None)


def test_check_aligned_layout_checks_the_counts() -> None:
    r = _routing(4)
    wrong = LocalRouting(r.local_ids, r.expert_counts + 1, r.invalid_count, r.aligned)
    with pytest.raises(AssertionError, match="expert_counts .* != slots per local expert"):
        check_aligned_layout(wrong, 4)
