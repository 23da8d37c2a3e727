"""flashinfer_onesided on real GPUs (torchrun, N ranks): exact layout, combine, torch_a2a parity, CUDA graphs.

Every rank regenerates every rank's tokens from seeds (`fi_testlib.make_tokens`),
so what each rank must receive and get back is known exactly: the received real
rows are compared bit for bit (as multisets: FlashInfer's slot order is
unspecified), every padding row's top-k ids must equal this receiving rank's
sentinel, ``rows_per_source`` must equal the true counts, and combine must
equal the fp32 sum over target ranks (bf16 rounding of a differently ordered
sum allowed) and the host's ``torch_a2a`` over NCCL on the same tokens.
Token counts are uneven and rank 1 sends nothing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import fi_testlib as L
import pytest
import torch

from hostcore import (
    BuildContext,
    ExpertPlacement,
    PreparedTokens,
    Stage,
    sentinel_verdict,
)
from hostcore.backends.dispatch_torch import TorchAllToAllDispatch
from hostcore.contract import check_received
from hostcore.placement import LocalExperts

SHAPES = {  # name: (hidden, top_k, experts per rank or total)
    "small": (1024, 4, None),
    "dsv3": (7168, 8, 256),
}
COUNTS = (37, 0, 5, 64, 17, 3, 0, 29)  # rank r sends COUNTS[r % 8] tokens
MAX_TOKENS = 128
STRATEGIES = ("non_local", "guard_slot", "auto")


def _experts(shape: str, world: int) -> int:
    hidden, top_k, experts = SHAPES[shape]
    return experts if experts else 8 * world


def _counts(world: int) -> list[int]:
    return [COUNTS[r % len(COUNTS)] for r in range(world)]


def choose_sentinel(strategy: str, local: LocalExperts, ctx: BuildContext) -> tuple[int, LocalExperts, str]:
    """The sentinel of ``strategy`` for this receiving rank: from the sentinel plugin if installed, else from the map."""
    try:
        from hostcore.registry import get_registry

        backend = get_registry().get(Stage.SENTINEL, strategy)
        sentinel, local = backend.factory(ctx).choose(local)
        return sentinel, local, "moe-plugin-sentinel"
    except Exception:
        table = local.expert_map[: local.global_num_experts].tolist()
        if strategy in ("non_local", "auto") and -1 in table:
            return table.index(-1), local, "map (first -1 entry)"
        guarded = local.with_map(torch.cat([local.expert_map, local.expert_map.new_full((1,), -1)]))
        return local.global_num_experts, guarded, "map (guard slot = E)"


def build_stage(ranks: Any, shape: str, strategy: str, api: str = "auto", scale_bytes: int = 0,
                max_tokens: int = MAX_TOKENS) -> tuple[Any, BuildContext]:
    from moe_plugin_flashinfer_onesided import build

    hidden, top_k, _ = SHAPES[shape]
    experts = _experts(shape, ranks.world)
    placement = ExpertPlacement.contiguous(experts, ranks.world)
    local = placement.local_experts(ranks.rank, True, ranks.device)
    ctx = BuildContext(rank=ranks.rank, ep_size=ranks.world, device=ranks.device, placement=placement, local=local,
                       hidden_size=hidden, top_k=top_k, dtype=torch.bfloat16, max_tokens_per_rank=max_tokens)
    sentinel, local, source = choose_sentinel(strategy, local, ctx)
    verdict = sentinel_verdict(sentinel, experts, local.expert_map)
    ranks.expect(bool(verdict), f"{strategy} sentinel {sentinel} ({source}) breaks the contract: {verdict.reason}")
    ctx = replace(ctx, local=local, sentinel=sentinel)
    return build(ctx, api=api, scale_bytes_per_token=scale_bytes), ctx


def tokens_of(rank: int, count: int, shape: str, world: int, device: torch.device, seed: int = 0,
              scale_cols: int = 0) -> PreparedTokens:
    hidden, top_k, _ = SHAPES[shape]
    t = L.make_tokens(rank, count, hidden, top_k, _experts(shape, world), torch.bfloat16, scale_cols, seed)
    return PreparedTokens(t["hidden"].to(device), t["topk_ids"].to(device), t["topk_weights"].to(device),
                          t["scales"].to(device) if scale_cols else None)


def check_layout(ranks: Any, received: Any, shape: str, counts: list[int], rows: int, seed: int = 0,
                 scale_cols: int = 0) -> None:
    """Local checks of the received layout (no collectives), problems collected."""
    hidden, top_k, _ = SHAPES[shape]
    host = type(received)(received.hidden.cpu(), received.topk_ids.cpu(), received.topk_weights.cpu(),
                          received.sentinel, None if received.rows_per_source is None else
                          received.rows_per_source.cpu(), None if received.scales is None else received.scales.cpu())
    ranks.expect(received.rows_per_source is not None, "rows_per_source is None (FlashInfer's counters not found)")
    ranks.attempt("received layout", L.check_received, host, ranks.rank, counts, hidden, top_k,
                  _experts(shape, ranks.world), ranks.world, torch.bfloat16, rows, scale_cols, seed)
    if received.rows_per_source is not None:
        ranks.attempt("hostcore check_received", check_received, host, _experts(shape, ranks.world))


def check_combined(ranks: Any, combined: torch.Tensor, shape: str, counts: list[int], seed: int = 0,
                   ref: torch.Tensor | None = None, what: str = "combine") -> None:
    hidden, top_k, _ = SHAPES[shape]
    want = L.expected_combined(ranks.rank, counts, hidden, top_k, _experts(shape, ranks.world), ranks.world,
                               torch.bfloat16, seed)
    got = combined.float().cpu()
    ranks.expect(tuple(combined.shape) == tuple(want.shape) and combined.dtype == torch.bfloat16,
                 f"{what}: got {combined.dtype} {tuple(combined.shape)}, want bf16 {tuple(want.shape)}")
    if got.shape == want.shape and got.numel():
        err = (got - want.float()).abs().max().item()
        ranks.expect(torch.allclose(got, want.float(), rtol=1e-2, atol=1e-2), f"{what}: max |err| {err:.4g}")
    if ref is not None and ref.shape == combined.shape and ref.numel():
        err = (ref.float() - combined.float()).abs().max().item()
        ranks.expect(torch.allclose(ref.float(), combined.float(), rtol=1e-2, atol=1e-2),
                     f"{what} vs torch_a2a: max |err| {err:.4g}")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_round_trip_matches_expectations_and_torch_a2a(ranks: Any, strategy: str, shape: str) -> None:
    stage, ctx = build_stage(ranks, shape, strategy)
    ref = TorchAllToAllDispatch(ctx)
    counts = _counts(ranks.world)
    # the third round reuses the first round's R: the adapter's cached workspace views are read again
    for seed, rows in ((0, None), (1, max(counts) + 5), (2, max(counts))):
        tokens = tokens_of(ranks.rank, counts[ranks.rank], shape, ranks.world, ranks.device, seed)
        with L.CountingAllReduce() as reduce:
            received = stage.dispatch(tokens, rows)
        r = max(counts) if rows is None else rows
        ranks.expect(reduce.calls == (1 if rows is None else 0), f"R={rows}: {reduce.calls} all-reduces")
        ranks.expect(received.sentinel == ctx.sentinel, f"sentinel {received.sentinel} != {ctx.sentinel}")
        check_layout(ranks, received, shape, counts, r, seed)
        combined = stage.combine(L.expert_output(received.hidden, ranks.rank))
        ref_recv = ref.dispatch(tokens, r)
        ref_out = ref.combine(L.expert_output(ref_recv.hidden, ranks.rank))
        check_combined(ranks, combined, shape, counts, seed, ref_out, f"{strategy}/{shape}/R={rows}")
    ranks.expect(stage.api == ("moe_ep" if ctx.sentinel >= ctx.placement.global_num_experts else "moe_alltoall"),
                 f"api {stage.api} ({stage.api_reason}) for sentinel {ctx.sentinel}")
    ranks.expect(stage._a2a.calls == "ops", f"per-forward calls go through {stage._a2a.calls}, not FlashInfer's ops "
                 "(their signatures differ from the ones the adapter knows)")
    ranks.verdict()


def test_both_flashinfer_apis_agree(ranks: Any) -> None:
    counts = _counts(ranks.world)
    outs = {}
    for api in ("moe_ep", "moe_alltoall"):
        stage, ctx = build_stage(ranks, "small", "guard_slot", api=api)
        ranks.expect(stage.api == api, f"asked for {api}, got {stage.api}")
        tokens = tokens_of(ranks.rank, counts[ranks.rank], "small", ranks.world, ranks.device, seed=5)
        received = stage.dispatch(tokens, max(counts))
        check_layout(ranks, received, "small", counts, max(counts), seed=5)
        outs[api] = stage.combine(L.expert_output(received.hidden, ranks.rank)).cpu()
        check_combined(ranks, outs[api], "small", counts, seed=5, what=api)
    ranks.expect(torch.equal(outs["moe_ep"], outs["moe_alltoall"]), "moe_ep and moe_alltoall combine differently")
    ranks.verdict()


def test_zero_copy_combine_and_scales(ranks: Any) -> None:
    counts = _counts(ranks.world)
    for api in ("moe_alltoall", "moe_ep"):
        stage, ctx = build_stage(ranks, "dsv3", "guard_slot", api=api, scale_bytes=224)  # 56 fp32 block scales
        tokens = tokens_of(ranks.rank, counts[ranks.rank], "dsv3", ranks.world, ranks.device, seed=7, scale_cols=56)
        received = stage.dispatch(tokens, max(counts))
        check_layout(ranks, received, "dsv3", counts, max(counts), seed=7, scale_cols=56)
        buf = stage.combine_input_buffer()
        buf.copy_(L.expert_output(received.hidden, ranks.rank))
        check_combined(ranks, stage.combine(buf), "dsv3", counts, seed=7, what=f"{api} zero-copy")
    ranks.verdict()


def test_every_rank_empty(ranks: Any) -> None:
    stage, ctx = build_stage(ranks, "small", "auto")
    counts = [0] * ranks.world
    for rows in (None, 4):
        tokens = tokens_of(ranks.rank, 0, "small", ranks.world, ranks.device)
        received = stage.dispatch(tokens, rows)
        r = 0 if rows is None else rows
        ranks.expect(received.rows_per_rank == r, f"R={received.rows_per_rank}, want {r}")
        check_layout(ranks, received, "small", counts, r)
        out = stage.combine(torch.zeros_like(received.hidden))
        ranks.expect(tuple(out.shape) == (0, SHAPES["small"][0]), f"combine of nothing: {tuple(out.shape)}")
    ranks.verdict()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_graph_replay_with_fixed_rows(ranks: Any, cuda_only: None, strategy: str) -> None:
    from moe_plugin_flashinfer_onesided.graphs import GraphedDispatchCombine

    stage, ctx = build_stage(ranks, "small", strategy)
    counts = _counts(ranks.world)
    rows = MAX_TOKENS  # the fixed R of a graph: the workspace's maximum
    static = tokens_of(ranks.rank, counts[ranks.rank], "small", ranks.world, ranks.device, seed=20)
    step = GraphedDispatchCombine(stage, static, rows, lambda rec: L.expert_output(rec.hidden, ranks.rank))
    for seed in (21, 22, 23):
        out = step.replay(tokens_of(ranks.rank, counts[ranks.rank], "small", ranks.world, ranks.device, seed))
        torch.cuda.synchronize()
        check_layout(ranks, step.received, "small", counts, rows, seed)  # padding rows hold the sentinel
        check_combined(ranks, out, "small", counts, seed, what=f"graph replay seed {seed}")
    ranks.verdict()


def test_rows_per_rank_none_is_refused_while_capturing(ranks: Any, cuda_only: None) -> None:
    stage, ctx = build_stage(ranks, "small", "auto")
    tokens = tokens_of(ranks.rank, 2, "small", ranks.world, ranks.device)
    graph, message = torch.cuda.CUDAGraph(), ""
    try:
        with torch.cuda.graph(graph):
            stage.dispatch(tokens, None)
    except Exception as exc:  # raised before any collective, on every rank alike
        message = str(exc)
    ranks.expect("while capturing a CUDA graph" in message, f"capture with R=None: {message!r}")
    ranks.verdict()
