"""Shared helpers of the flashinfer_onesided CPU tests: the fake FlashInfer, rank processes, exact expectations.

``run_ranks`` starts ``world`` processes (spawn) in a gloo group, each with the
fake FlashInfer (``tests/fake_site``) first on ``sys.path``, and runs a
function from this module on each; an exception in any rank fails the test
with that rank's traceback, and a hang fails it after ``timeout`` seconds.

`expected_received` / `expected_combined` compute, from the seeded token
generator alone, what every rank must receive and get back, so the tests
compare against exact expectations as well as against ``torch_a2a``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parent
FAKE_SITE = TESTS / "fake_site"
PLUGIN_ROOT = TESTS.parent


def use_fake_flashinfer() -> None:
    """Make ``import flashinfer`` (and its package metadata) resolve to the fake, in this process."""
    for path in (str(PLUGIN_ROOT), str(FAKE_SITE)):
        if path not in sys.path:
            sys.path.insert(0, path)
    for name in [m for m in sys.modules if m == "flashinfer" or m.startswith("flashinfer.")]:
        del sys.modules[name]
    import flashinfer

    assert getattr(flashinfer, "FAKE", False), f"expected the fake flashinfer, got {flashinfer.__file__}"


# -- processes ----------------------------------------------------------------------------------------


def _entry(rank: int, world: int, store: str, fn_name: str, args: tuple, out_dir: str) -> None:
    use_fake_flashinfer()
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        result = globals()[fn_name](rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 90.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` (a function of this module) on ``world`` gloo ranks; return their results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="fi_ranks_") as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_entry, args=(world, store, fn.__name__, args, tmp), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{fn.__name__} did not finish on {world} ranks within {timeout:.0f} s "
                                   "(a collective mismatch between ranks hangs)")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# -- workspace ----------------------------------------------------------------------------------------


def expected_workspace_bytes(ep: int, max_tokens: int, dispatch_bytes: int, combine_bytes: int) -> int:
    """FlashInfer's formula, written out independently: aux region (C++ calculateOffsets: counters, flags,
    per-token top-k scratch for kMaxTopK=22, each 128-aligned) + dispatch planes + combine plane."""
    def pad(x: int) -> int:
        return (x + 127) // 128 * 128

    off = 8 + 8 * ep
    off = pad(off) + 4 * ep
    off = pad(off) + 4 * ep
    off = pad(off) + max_tokens * 22 * 4
    off = pad(off) + max_tokens * 22 * 4
    aux = pad(pad(off))
    return aux + pad(ep * max_tokens * dispatch_bytes) + pad(ep * max_tokens * combine_bytes)


# -- workloads and exact expectations -----------------------------------------------------------------


def make_tokens(rank: int, count: int, hidden: int, top_k: int, experts: int, dtype: torch.dtype,
                scale_cols: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic tokens of one source rank: distinct experts per token, a unique uid in weights[:, 0]."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(count)]) if count else \
        torch.empty((0, top_k), dtype=torch.long)
    weights = torch.rand((count, top_k), generator=g)
    weights[:, 0] = torch.arange(count, dtype=torch.float32) + 1000.0 * rank + 0.5  # uid, exact in fp32
    hidden_t = torch.randn((count, hidden), generator=g).to(dtype)
    out = {"hidden": hidden_t, "topk_ids": ids.to(torch.int32), "topk_weights": weights.float()}
    if scale_cols:
        out["scales"] = torch.rand((count, scale_cols), generator=g)
    return out


def owners(ids: torch.Tensor, experts: int, ep: int) -> list[list[int]]:
    """Per token, the distinct ranks it goes to (contiguous partition)."""
    per = experts // ep
    return [sorted({e // per for e in row}) for row in ids.tolist()]


def expected_received(me: int, counts: Sequence[int], hidden: int, top_k: int, experts: int, ep: int,
                      dtype: torch.dtype, scale_cols: int = 0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per source rank, the rows ``me`` must receive (any order), as tensors keyed like `make_tokens`."""
    out = []
    for s, n in enumerate(counts):
        tok = make_tokens(s, n, hidden, top_k, experts, dtype, scale_cols, seed)
        keep = [i for i, o in enumerate(owners(tok["topk_ids"], experts, ep)) if me in o]
        idx = torch.tensor(keep, dtype=torch.long)
        out.append({k: v[idx] for k, v in tok.items()})
    return out


def expert_output(received_hidden: torch.Tensor, rank: int) -> torch.Tensor:
    """The stand-in expert compute of the tests: rank-dependent, elementwise, exact to reproduce."""
    return (received_hidden.float() * (rank + 1) + 0.25 * (rank + 1)).to(received_hidden.dtype)


def expected_combined(me: int, counts: Sequence[int], hidden: int, top_k: int, experts: int, ep: int,
                      dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[T, H]``: the unweighted fp32 sum over the token's target ranks of `expert_output`, cast to ``dtype``."""
    tok = make_tokens(me, counts[me], hidden, top_k, experts, dtype, seed=seed)
    acc = torch.zeros((counts[me], hidden), dtype=torch.float32)
    for t, targets in enumerate(owners(tok["topk_ids"], experts, ep)):
        for d in targets:
            acc[t] += expert_output(tok["hidden"][t: t + 1], d)[0].float()
    return acc.to(dtype)


def sort_by_uid(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    order = torch.argsort(rows["topk_weights"][:, 0])
    return {k: v[order] for k, v in rows.items()}


def check_received(received: Any, me: int, counts: Sequence[int], hidden: int, top_k: int, experts: int, ep: int,
                   dtype: torch.dtype, rows: int, scale_cols: int = 0, seed: int = 0) -> None:
    """Assert the layout: ``[ep, R, ...]``, real rows = the exact expected multiset, padding ids = sentinel."""
    assert tuple(received.topk_ids.shape) == (ep, rows, top_k), received.topk_ids.shape
    assert received.topk_ids.dtype == torch.int32 and received.topk_weights.dtype == torch.float32
    assert received.hidden.dtype == dtype and tuple(received.hidden.shape) == (ep, rows, hidden)
    want = expected_received(me, counts, hidden, top_k, experts, ep, dtype, scale_cols, seed)
    for s in range(ep):
        n = len(want[s]["topk_ids"])
        if received.rows_per_source is not None:
            assert int(received.rows_per_source[s]) == n, (s, received.rows_per_source.tolist(), n)
        got = {"hidden": received.hidden[s, :n], "topk_ids": received.topk_ids[s, :n],
               "topk_weights": received.topk_weights[s, :n]}
        if scale_cols:
            got["scales"] = received.scales[s, :n]
        got, exp = sort_by_uid(got), sort_by_uid(want[s])
        for k in exp:
            assert torch.equal(got[k], exp[k]), f"source {s}: {k} differs"
        pad = received.topk_ids[s, n:]
        assert bool((pad == received.sentinel).all()), f"source {s}: padding ids {pad.tolist()} != sentinel"


# -- rank functions (run by run_ranks) ----------------------------------------------------------------


def context(rank: int, ep: int, experts: int, hidden: int, top_k: int, dtype: torch.dtype, max_tokens: int,
            sentinel: int | None, group: Any = None, placement: Any = None) -> Any:
    from hostcore.hookspecs import BuildContext
    from hostcore.placement import ExpertPlacement

    placement = placement or ExpertPlacement.contiguous(experts, ep)
    return BuildContext(rank=rank, ep_size=ep, device=torch.device("cpu"), placement=placement,
                        local=placement.local_experts(rank, True), hidden_size=hidden, top_k=top_k, dtype=dtype,
                        max_tokens_per_rank=max_tokens, group=group, sentinel=sentinel)


def non_local_sentinel(rank: int, ep: int, experts: int) -> int:
    """vLLM's fix: the first expert not owned by ``rank`` (contiguous placement)."""
    from hostcore.placement import ExpertPlacement

    table = ExpertPlacement.contiguous(experts, ep).expert_map(rank).tolist()
    return table.index(-1)


def cpu_stage(ctx: Any, **options: Any) -> Any:
    """Build the stage through the real factory, letting it run on the CPU (the fake is CPU-only)."""
    from moe_plugin_flashinfer_onesided import dispatch

    real = dispatch._require_cuda
    dispatch._require_cuda = lambda device: torch.device(device)
    try:
        return dispatch.build(ctx, **options)
    finally:
        dispatch._require_cuda = real


class CountingAllReduce:
    """Counts ``torch.distributed.all_reduce`` calls (the only collective agreeing on R may add)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.calls = 0
        self._dist, self._real = dist, dist.all_reduce

    def __enter__(self) -> CountingAllReduce:
        def counted(*a: Any, **k: Any) -> Any:
            self.calls += 1
            return self._real(*a, **k)
        self._dist.all_reduce = counted
        return self

    def __exit__(self, *exc: object) -> None:
        self._dist.all_reduce = self._real


def round_trip(stage: Any, torch_ref: Any, me: int, ep: int, counts: Sequence[int], rows: int | None, hidden: int,
               top_k: int, experts: int, dtype: torch.dtype, scale_cols: int = 0, seed: int = 0,
               zero_copy: bool = False) -> dict[str, Any]:
    """One dispatch + combine through ``stage`` (and ``torch_ref`` when given), checked exactly; returns stats."""
    from flashinfer.comm.trtllm_moe_alltoall import STATS

    from hostcore.contract import PreparedTokens

    tok = make_tokens(me, counts[me], hidden, top_k, experts, dtype, scale_cols, seed)
    tokens = PreparedTokens(tok["hidden"], tok["topk_ids"], tok["topk_weights"], tok.get("scales"))
    before = dict(STATS)
    with CountingAllReduce() as reduce:
        received = stage.dispatch(tokens, rows)
    r = max(counts) if rows is None else rows
    check_received(received, me, counts, hidden, top_k, experts, ep, dtype, r, scale_cols, seed)
    out_rows = expert_output(received.hidden, me)
    if zero_copy and r:
        buf = stage.combine_input_buffer()
        buf.copy_(out_rows)
        out_rows = buf
    combined = stage.combine(out_rows)
    want = expected_combined(me, counts, hidden, top_k, experts, ep, dtype, seed)
    assert combined.shape == want.shape and combined.dtype == dtype
    assert torch.equal(combined, want), "combine differs from the exact expectation"
    if torch_ref is not None:
        ref_recv = torch_ref.dispatch(PreparedTokens(tok["hidden"], tok["topk_ids"], tok["topk_weights"]), r)
        assert torch.equal(ref_recv.rows_per_source, received.rows_per_source) \
            if received.rows_per_source is not None else True
        ref_out = torch_ref.combine(expert_output(ref_recv.hidden, me))
        # same fp32 sum over target ranks, possibly in another order: bf16-level agreement
        assert torch.allclose(combined.float(), ref_out.float(), rtol=1e-2, atol=1e-2), "combine != torch_a2a"
    after = dict(STATS)
    return {"all_reduce": reduce.calls, "rows": r,
            "stats": {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}}


COUNTS = (5, 0, 9, 2)  # uneven, and rank 1 sends nothing
EXPERTS_PER_RANK, HIDDEN, TOP_K, MAX_TOKENS = 4, 64, 3, 16


def _sentinel(strategy: str, rank: int, ep: int, experts: int) -> int:
    return non_local_sentinel(rank, ep, experts) if strategy == "non_local" else experts  # guard_slot: E


def scenario_transport(rank: int, world: int, api: str, strategy: str, dtype_name: str,
                       calls: str = "ops") -> dict[str, Any]:
    """Round trips through the factory-built stage vs exact expectations and torch_a2a on the same group.

    ``calls="methods"`` makes the adapter see FlashInfer ops with unknown signatures, so it goes through
    ``MoeAlltoAll``'s methods instead (its path for other FlashInfer versions). The round trips reuse
    ``R`` values (agreed 9, then 16, 11, 3 and 9 again), so cached workspace views are read again too.
    """
    from moe_plugin_flashinfer_onesided import _flashinfer

    real_match = _flashinfer._ops_match
    if calls == "methods":
        _flashinfer._ops_match = lambda ops: False
    try:
        return _transport(rank, world, api, strategy, dtype_name)
    finally:
        _flashinfer._ops_match = real_match


def _transport(rank: int, world: int, api: str, strategy: str, dtype_name: str) -> dict[str, Any]:
    from hostcore.backends.dispatch_torch import TorchAllToAllDispatch
    from hostcore.errors import ContractError

    dtype = getattr(torch, dtype_name)
    ep, experts = world, EXPERTS_PER_RANK * world
    counts = COUNTS[:ep]
    sentinel = _sentinel(strategy, rank, ep, experts)
    ctx = context(rank, ep, experts, HIDDEN, TOP_K, dtype, MAX_TOKENS, sentinel)
    stage = cpu_stage(ctx, api=api)
    ref = TorchAllToAllDispatch(ctx)
    out: dict[str, Any] = {"api": stage.api, "reason": stage.api_reason, "sentinel": stage.sentinel,
                           "workspace": stage.workspace_bytes, "calls": stage._a2a.calls}
    args = (HIDDEN, TOP_K, experts, dtype)
    out["agreed"] = round_trip(stage, ref, rank, ep, counts, None, *args)
    out["given"] = round_trip(stage, ref, rank, ep, counts, MAX_TOKENS, *args, seed=1)
    out["zero_copy"] = round_trip(stage, None, rank, ep, counts, 11, *args, seed=2, zero_copy=True)
    out["all_empty_agreed"] = round_trip(stage, None, rank, ep, [0] * ep, None, *args)
    out["all_empty_given"] = round_trip(stage, None, rank, ep, [0] * ep, 3, *args)
    # Caller mistakes raise on the rank that made them, after taking part in the collective, so nobody hangs.
    from hostcore.contract import PreparedTokens

    tok = make_tokens(rank, counts[rank], HIDDEN, TOP_K, experts, dtype, seed=3)
    tokens = PreparedTokens(tok["hidden"], tok["topk_ids"], tok["topk_weights"])
    received = stage.dispatch(tokens, MAX_TOKENS)
    try:
        stage.dispatch(tokens, MAX_TOKENS)
        out["twice"] = "no error"
    except ContractError as exc:
        out["twice"] = str(exc)
    bad = expert_output(received.hidden, rank)
    if rank == 0:
        bad = bad[:, :-1]  # wrong R on rank 0 only
    try:
        combined = stage.combine(bad)
        out["bad_combine"] = None
        want = expected_combined(rank, counts, HIDDEN, TOP_K, experts, ep, dtype, seed=3)
        # rank 0 contributed zeros: tokens that went to rank 0 lack its share, the rest are exact
        to0 = [0 in o for o in owners(tok["topk_ids"], experts, ep)]
        keep = torch.tensor([not x for x in to0], dtype=torch.bool)
        assert torch.equal(combined[keep], want[keep])
    except ContractError as exc:
        out["bad_combine"] = str(exc)
    out["after_error"] = round_trip(stage, ref, rank, ep, counts, None, *args, seed=4)
    return out


def scenario_scales(rank: int, world: int) -> dict[str, Any]:
    """A quantizing prepare's scales travel as a fourth payload when the workspace reserves room for them."""
    from hostcore.contract import PreparedTokens
    from hostcore.errors import ContractError

    ep, experts, dtype = world, EXPERTS_PER_RANK * world, torch.bfloat16
    out: dict[str, Any] = {}
    for api in ("moe_alltoall", "moe_ep"):
        ctx = context(rank, ep, experts, HIDDEN, TOP_K, dtype, MAX_TOKENS, experts)
        stage = cpu_stage(ctx, api=api, scale_bytes_per_token=12)
        args = (HIDDEN, TOP_K, experts, dtype)
        # with scales, without, with again at the same R: each payload layout has its own views and combine region
        out[api] = {"api": stage.api,
                    "roundtrip": round_trip(stage, None, rank, ep, COUNTS[:ep], None, *args, scale_cols=3),
                    "no_scales": round_trip(stage, None, rank, ep, COUNTS[:ep], None, *args, seed=1),
                    "again": round_trip(stage, None, rank, ep, COUNTS[:ep], None, *args, scale_cols=3, seed=2,
                                        zero_copy=True)}
        tok = make_tokens(rank, 2, HIDDEN, TOP_K, experts, dtype, scale_cols=4)
        try:
            stage.dispatch(PreparedTokens(tok["hidden"], tok["topk_ids"], tok["topk_weights"], tok["scales"]), 4)
            out[api]["too_wide"] = None
        except ContractError as exc:
            out[api]["too_wide"] = str(exc)
    return out


def scenario_subgroups(rank: int, world: int) -> dict[str, Any]:
    """Two EP groups of 2 in a world of 4: everything must run on BuildContext.group, not the world."""
    import torch.distributed as dist

    from hostcore.backends.dispatch_torch import TorchAllToAllDispatch

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    which, me = rank // 2, rank % 2
    ep, experts, dtype = 2, 8, torch.float32
    ctx = context(me, ep, experts, HIDDEN, TOP_K, dtype, MAX_TOKENS, _sentinel("non_local", me, ep, experts),
                  group=groups[which])
    stage = cpu_stage(ctx)
    counts = [(3, 7), (6, 1)][which]
    res = round_trip(stage, TorchAllToAllDispatch(ctx), me, ep, counts, None, HIDDEN, TOP_K, experts, dtype,
                     seed=10 + which)
    return {"rows": res["rows"], "all_reduce": res["all_reduce"]}


def scenario_refusals(rank: int, world: int) -> dict[str, str]:
    """Build-time refusals that need the group: every rank must refuse together (no rank left waiting)."""
    from hostcore.errors import HostcoreError

    ep, experts = world, EXPERTS_PER_RANK * world
    out = {}
    hidden = HIDDEN if rank == 0 else HIDDEN // 2
    for name, ctx, opts in [
        ("disagree", context(rank, ep, experts, hidden, TOP_K, torch.bfloat16, MAX_TOKENS, experts), {}),
        ("moe_ep_in_range", context(rank, ep, experts, HIDDEN, TOP_K, torch.bfloat16, MAX_TOKENS,
                                    non_local_sentinel(rank, ep, experts)), {"api": "moe_ep"}),
    ]:
        try:
            cpu_stage(ctx, **opts)
            out[name] = "built"
        except HostcoreError as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def scenario_nvlink_refused(rank: int, world: int) -> dict[str, str]:
    """moe_ep's NVML check fails (fake): api=auto falls back to MoeAlltoAll on every rank, api=moe_ep raises."""
    os.environ["FAKE_FLASHINFER_NO_NVLINK"] = "1"
    ep, experts = world, EXPERTS_PER_RANK * world
    ctx = context(rank, ep, experts, HIDDEN, TOP_K, torch.bfloat16, MAX_TOKENS, experts)
    try:
        stage = cpu_stage(ctx)
        out = {"auto": f"{stage.api}: {stage.api_reason}"}
        round_trip(stage, None, rank, ep, COUNTS[:ep], None, HIDDEN, TOP_K, experts, torch.bfloat16)
        try:
            cpu_stage(ctx, api="moe_ep")
            out["moe_ep"] = "built"
        except RuntimeError as exc:
            out["moe_ep"] = str(exc)
    finally:
        del os.environ["FAKE_FLASHINFER_NO_NVLINK"]
    return out


def run_suite(rank: int, world: int, jobs: list[tuple[str, tuple]]) -> dict[str, Any]:
    """Run several scenarios in one set of rank processes (starting processes dominates the test time)."""
    return {f"{name}{args}": globals()[name](rank, world, *args) for name, args in jobs}


def scenario_layer(rank: int, world: int) -> dict[str, Any]:
    """A whole `EPMoELayer` forward with ``dispatch=flashinfer_onesided`` (the fake) and the torch experts.

    Checks the output against the dense reference, and that the experts wrote straight into FlashInfer's combine
    workspace (the layer's zero-copy path: combine was told the payload is in the workspace).
    """
    from dataclasses import replace

    from moe_plugin_flashinfer_onesided import dispatch

    from hostcore.contract import Stage
    from hostcore.layer import EPMoELayer
    from hostcore.placement import ExpertPlacement
    from hostcore.registry import Registry
    from hostcore.workload import MoEShape, dense_reference, experts_weights, synthetic_router_output

    shape = MoEShape("fi-layer", 256, 128, 8, 2)
    placement = ExpertPlacement.contiguous(shape.num_experts, world)
    tokens = [6, 0, 3, 5][:world]
    weights = experts_weights(shape, placement.local_experts(rank, True).global_ids(), seed=4)
    registry = Registry.discover()
    fi = registry.backends[Stage.DISPATCH]["flashinfer_onesided"]
    registry.backends[Stage.DISPATCH]["flashinfer_onesided"] = replace(fi, availability=lambda: None)  # CPU fake
    real = dispatch._require_cuda
    dispatch._require_cuda = lambda device: torch.device(device)
    try:
        layer = EPMoELayer(placement, weights, hidden_size=shape.hidden_size, top_k=shape.top_k,
                           max_tokens_per_rank=max(tokens), dtype=torch.float32, rank=rank, registry=registry,
                           backends="dispatch=flashinfer_onesided(api=moe_alltoall),sentinel=auto")
    finally:
        dispatch._require_cuda = real
    in_workspace: list[bool] = []
    a2a_combine = layer.dispatch._a2a.combine

    def recording(payload: torch.Tensor, rows: int, payload_in_workspace: bool, output: torch.Tensor) -> torch.Tensor:
        in_workspace.append(payload_in_workspace)
        return a2a_combine(payload, rows, payload_in_workspace, output)

    layer.dispatch._a2a.combine = recording
    router = synthetic_router_output(shape, tokens[rank], seed=4, rank=rank, dtype=torch.float32)
    out = layer.forward(router.hidden, router.topk_ids, router.topk_weights, rows_per_rank=max(tokens))
    ref = dense_reference(router, shape, seed=4, compute_dtype=torch.float64)
    rel = float((out.double() - ref).norm() / ref.norm()) if ref.numel() else 0.0
    return {"rel_err": rel, "in_workspace": in_workspace, "tokens": tokens[rank]}
