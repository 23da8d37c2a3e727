"""GPU tests of the ``marlin`` experts backend (skipped without a GPU / CuPy).

* the host's conformance kit (`hostcore.conformance.ExpertsContract`);
* a sweep over the model shapes of `hostcore.workload.SHAPES` (tiny, qwen3-30b-a3b,
  mixtral-8x7b, deepseek-v3 with EP 8/4 local subsets) x rows per source M x expert
  maps (none, EP 2/4/8) x every valid padding sentinel, on fresh random inputs with
  NaN padding rows and NaN-poisoned workspaces, against ``moe_reference`` in float64;
  both the stage's own align kernel and a layout handed in by the torch preprocess;
* CUDA-graph capture and replay, split-K, ``out=``.

``MARLIN_RESULTS_JSONL=<path>`` appends one JSON line per sweep case (the GPU
script turns them into GPU_RESULTS.md); ``MARLIN_SWEEP_MS=1,16,...`` narrows M.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import replace

import pytest
import torch
from moe_plugin_marlin.jit import availability

from hostcore import BuildContext, ExpertPlacement, LocalRouting, cuda_graphs
from hostcore.backends.experts_torch import moe_reference
from hostcore.backends.preprocess_torch import align_blocks, expert_counts
from hostcore.conformance import ExpertsContract, valid_sentinels
from hostcore.conformance.data import expected_local_ids, padding_mask, received_ids
from hostcore.quant import QuantizedExperts
from hostcore.workload import SHAPES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(availability() is not None, reason=f"marlin backend unavailable: {availability()}")]

RTOL = 1e-2
MS = [int(m) for m in os.environ.get("MARLIN_SWEEP_MS", "1,2,4,8,16,32,64,128,256,1024").split(",")]


class TestMarlinConformance(ExpertsContract):
    backend = "marlin"
    device = "cuda"
    dtypes = (torch.bfloat16, torch.float16)


def random_gptq(num_experts: int, h: int, i: int, group: int | None, dtype: torch.dtype, gen: torch.Generator,
                device: str = "cuda") -> QuantizedExperts:
    """Random GPTQ weights drawn on the GPU: random 32-bit words are valid uint4b8 data (every nibble 0..15)."""

    def one(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.randint(-2**31, 2**31, (num_experts, k // 8, n), dtype=torch.int64, device=device,
                          generator=gen).to(torch.int32)
        g = k if group is None else group
        s = (0.5 + torch.rand((num_experts, k // g, n), device=device, generator=gen)) / (4.6 * k**0.5)
        return q, s.to(dtype)

    a, b = one(h, 2 * i)
    c, d = one(i, h)
    return QuantizedExperts(a, b, c, d, group)


def build_stage(shape_name: str, dtype: torch.dtype, ep: int, kind: str, rank: int, max_rows: int, seed: int,
                block_m: int = 0):
    from moe_plugin_marlin.stage import MarlinExperts

    s = SHAPES[shape_name]
    maker = ExpertPlacement.round_robin if kind == "round_robin" else ExpertPlacement.contiguous
    placement = maker(s.num_experts, ep)
    local = placement.local_experts(rank, use_map=ep > 1, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weights = random_gptq(local.count, s.hidden_size, s.intermediate_size, s.group_size, dtype, gen)
    ctx = BuildContext(rank=rank, ep_size=ep, device=torch.device("cuda"), placement=placement, local=local,
                       hidden_size=s.hidden_size, top_k=s.top_k, dtype=dtype, max_tokens_per_rank=max_rows,
                       weights=weights)
    return MarlinExperts(ctx, block_m=block_m), weights, placement, local


def run_case(stage, weights: QuantizedExperts, placement: ExpertPlacement, local, m: int, top_k: int,
             case: int, gen: torch.Generator, use_layout: bool) -> dict:
    """One sweep case: returns the record (and asserts)."""
    e = placement.global_num_experts
    ep = placement.ep_size
    sentinels = valid_sentinels(local.__class__(local.global_num_experts, local.count,
                                                None if local.expert_map is None else local.expert_map.cpu(),
                                                local.first))
    pad_sentinel = sentinels[case % len(sentinels)]
    rows = [m] + [int(torch.randint(0, m + 1, (1,), generator=gen)) for _ in range(ep - 1)]
    ids = received_ids(gen, rows, m, top_k, e, pad_sentinel.sentinel)
    local_ids, _ = expected_local_ids(ids, pad_sentinel.local)
    n = ids.shape[0]
    pad = padding_mask(rows, m)
    dtype = stage.dtype
    hidden = torch.randn((n, stage.hidden_size), generator=gen).to(dtype)
    topw = torch.softmax(torch.randn((n, top_k), generator=gen), dim=1)
    hidden[pad] = float("nan")
    topw[pad] = float("nan")
    hidden, topw, local_ids = hidden.cuda(), topw.cuda(), local_ids.cuda()
    counts = expert_counts(local_ids, stage.num_local)
    aligned = align_blocks(local_ids, counts, stage.block_m) if use_layout else None
    routing = LocalRouting(local_ids, counts, None, aligned)
    stage.reserve(n, top_k)
    for buf in (stage.inter, stage.slot_out, stage.out):
        buf.fill_(float("nan"))  # poison: anything read before written shows up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = stage.compute(hidden, topw, routing)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ref = moe_reference(hidden.float(), topw, local_ids, weights, torch.float64).double()
    got = out.double()
    active = (local_ids >= 0).any(dim=1)
    idle_ok = bool((got[~active] == 0).all())
    finite = bool(got.isfinite().all())
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30)) if bool(active.any()) else 0.0
    from moe_plugin_marlin.stage import describe_tiles
    rec = {"rows_per_source": m, "N": n, "active_rows": int(active.sum()), "local_slots": int((local_ids >= 0).sum()),
           "sentinel": f"{pad_sentinel.how}={pad_sentinel.sentinel}",
           "layout": "torch preprocess" if use_layout else "own align", "rel_err": err, "finite": finite,
           "idle_rows_zero": idle_ok, "first_call_s": dt, **describe_tiles(stage, n, top_k)}
    rec["ok"] = finite and idle_ok and err < RTOL
    return rec


SWEEP = [
    ("tiny", torch.bfloat16, 1, "contiguous"), ("tiny", torch.bfloat16, 2, "round_robin"),
    ("tiny", torch.bfloat16, 4, "contiguous"), ("tiny", torch.bfloat16, 8, "contiguous"),
    ("tiny", torch.float16, 2, "contiguous"),
    ("qwen3-30b-a3b", torch.bfloat16, 1, "contiguous"), ("qwen3-30b-a3b", torch.bfloat16, 2, "round_robin"),
    ("qwen3-30b-a3b", torch.bfloat16, 4, "contiguous"), ("qwen3-30b-a3b", torch.bfloat16, 8, "round_robin"),
    ("qwen3-30b-a3b", torch.float16, 1, "contiguous"),
    ("mixtral-8x7b", torch.bfloat16, 1, "contiguous"), ("mixtral-8x7b", torch.bfloat16, 2, "contiguous"),
    ("mixtral-8x7b", torch.bfloat16, 4, "round_robin"), ("mixtral-8x7b", torch.bfloat16, 8, "contiguous"),
    ("mixtral-8x7b", torch.float16, 2, "contiguous"),
    ("deepseek-v3", torch.bfloat16, 8, "contiguous"), ("deepseek-v3", torch.bfloat16, 4, "round_robin"),
    ("deepseek-v3", torch.float16, 8, "round_robin"),
]


@pytest.mark.parametrize("shape_name,dtype,ep,kind", SWEEP,
                         ids=[f"{s}-{str(d)[6:]}-ep{e}-{k}" for s, d, e, k in SWEEP])
def test_sweep_against_float64_reference(shape_name, dtype, ep, kind):
    seed = random.randrange(2**31)  # fresh inputs every run; printed on failure
    rank = ep - 1 if ep > 1 else 0  # the last rank: the one that gets only padding from uneven sources
    rows_per_source = [m for m in MS if not (shape_name == "deepseek-v3" and ep == 4 and m > 256)]
    stage, weights, placement, local = build_stage(shape_name, dtype, ep, kind, rank, max(rows_per_source), seed)
    gen = torch.Generator().manual_seed(seed)
    s = SHAPES[shape_name]
    failures = []
    for case, m in enumerate(rows_per_source):
        rec = run_case(stage, weights, placement, local, m, s.top_k, case, gen, use_layout=case % 2 == 1)
        rec.update({"shape": shape_name, "dtype": str(dtype)[6:], "ep": ep, "placement": kind, "rank": rank,
                    "local_experts": local.count, "seed": seed})
        _record(rec)
        if not rec["ok"]:
            failures.append(rec)
    assert not failures, f"{len(failures)} failing cases (seed {seed}): " + "; ".join(
        f"M={r['rows_per_source']} err={r['rel_err']:.3g} finite={r['finite']} idle0={r['idle_rows_zero']} "
        f"{r['layout']} {r['gemm1']}|{r['gemm2']}" for r in failures[:6])
    del stage
    torch.cuda.empty_cache()


def _record(rec: dict) -> None:
    path = os.environ.get("MARLIN_RESULTS_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_fixed_block_m_and_out(block_m):
    stage, weights, placement, local = build_stage("qwen3-30b-a3b", torch.bfloat16, 2, "contiguous", 1, 64, 7,
                                                   block_m=block_m)
    gen = torch.Generator().manual_seed(block_m)
    rec = run_case(stage, weights, placement, local, 48, 8, 0, gen, use_layout=True)
    assert rec["ok"], rec
    # out= receives the result (poisoned first)
    n = rec["N"]
    hidden = torch.randn((n, 2048), generator=gen).to(torch.bfloat16).cuda()
    ids = torch.randint(0, 64, (n, 8), generator=gen, dtype=torch.int32)
    ids[:, 1:] = -1
    local_ids = ids.cuda()
    routing = LocalRouting(local_ids, expert_counts(local_ids, stage.num_local))
    topw = torch.rand((n, 8)).cuda()
    out = torch.full((n, 2048), float("nan"), dtype=torch.bfloat16, device="cuda")
    res = stage.compute(hidden, topw, routing, out=out)
    assert res.data_ptr() == out.data_ptr() and bool(out.isfinite().all())
    ref = moe_reference(hidden.float(), topw, local_ids, weights, torch.float64).double()
    assert float((out.double() - ref).norm() / ref.norm()) < RTOL


def test_split_k_and_cuda_graph():
    """A shape that plans K splits for GEMM2 (atomics into zeroed fp32 rows), eager vs captured graph."""
    from moe_plugin_marlin.stage import MarlinExperts, describe_tiles

    h, i, e, top_k, rows = 1024, 4096, 4, 2, 3
    placement = ExpertPlacement.contiguous(e, 1)
    local = placement.local_experts(0, use_map=False, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    weights = random_gptq(e, h, i, 128, torch.bfloat16, gen)
    ctx = BuildContext(rank=0, ep_size=1, device=torch.device("cuda"), placement=placement, local=local,
                       hidden_size=h, top_k=top_k, dtype=torch.bfloat16, max_tokens_per_rank=rows, weights=weights)
    stage = MarlinExperts(ctx)
    tiles = describe_tiles(stage, rows, top_k)
    assert "split" in tiles["gemm2"], tiles
    hidden = torch.randn((rows, h), device="cuda").to(torch.bfloat16)
    topw = torch.rand((rows, top_k), device="cuda")
    local_ids = torch.tensor([[0, 3], [1, -1], [2, 1]], dtype=torch.int32, device="cuda")
    routing = LocalRouting(local_ids, expert_counts(local_ids, e))
    eager = stage.compute(hidden, topw, routing).clone()
    ref = moe_reference(hidden.float(), topw, local_ids, weights, torch.float64).double()
    assert float((eager.double() - ref).norm() / ref.norm()) < RTOL
    graph, static_out = cuda_graphs.capture(lambda: stage.compute(hidden, topw, routing))
    for trial in range(3):  # new data through the same buffers
        hidden.copy_(torch.randn((rows, h), device="cuda").to(torch.bfloat16))
        topw.copy_(torch.rand((rows, top_k), device="cuda"))
        local_ids.copy_(torch.randint(-1, e, (rows, top_k), device="cuda", dtype=torch.int32))
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = moe_reference(hidden.float(), topw, local_ids, weights, torch.float64).double()
        got = static_out.double()
        active = (local_ids >= 0).any(dim=1)
        assert bool((got[~active] == 0).all())
        if bool(active.any()):
            assert float((got - ref).norm() / ref.norm()) < RTOL, trial


def test_graph_replay_matches_eager_bitwise():
    """Without K splits the result is deterministic: a graph replay equals the eager call bit for bit."""
    stage, weights, placement, local = build_stage("qwen3-30b-a3b", torch.bfloat16, 1, "contiguous", 0, 16, 11)
    n, top_k = 16, 8
    hidden = torch.randn((n, 2048), device="cuda").to(torch.bfloat16)
    topw = torch.rand((n, top_k), device="cuda")
    local_ids = torch.stack([torch.randperm(128, device="cuda")[:top_k] for _ in range(n)]).to(torch.int32)
    routing = LocalRouting(local_ids, expert_counts(local_ids, 128))
    eager = stage.compute(hidden, topw, routing).clone()
    graph, static_out = cuda_graphs.capture(lambda: stage.compute(hidden, topw, routing))
    static_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)


def test_wrong_device_and_layout_errors():
    from hostcore.errors import ContractError

    stage, weights, placement, local = build_stage("tiny", torch.bfloat16, 1, "contiguous", 0, 8, 1)
    hidden = torch.randn((4, 256)).to(torch.bfloat16)
    ids = torch.zeros((4, 2), dtype=torch.int32)
    with pytest.raises(ContractError, match="is on cpu"):
        stage.compute(hidden, torch.rand(4, 2), LocalRouting(ids, torch.zeros(8, dtype=torch.int32)))
    hidden, ids = hidden.cuda(), ids.cuda()
    counts = expert_counts(ids, 8)
    bad = align_blocks(ids, counts, 16)
    bad = replace(bad, block_expert_ids=bad.block_expert_ids[:-1])
    with pytest.raises(ContractError, match="len\\(block_expert_ids\\) \\* block_m"):
        stage.compute(hidden, torch.rand(4, 2, device="cuda"), LocalRouting(ids, counts, None, bad))


TILE_GROUPS = [None, 32, 128]
"""Per-channel, a group smaller than every stage's K depth (32: several scale rows per stage) and one equal to /
larger than / smaller than it (128 vs tk 128 / 64 / 256); the kernel reserves each stage's scale area for g = 16."""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("group", TILE_GROUPS, ids=[f"g{g}" if g else "perchannel" for g in TILE_GROUPS])
def test_every_tile_against_float64_reference(dtype, group):
    """Every tile configuration of `jit.TILE_CONFIGS` (forced through ``tile_override``; block_m 16, 32 and
    64), without and with K splits on GEMM2 (fp32 atomics), with expert skipping (EP 2 with a map; ids -1)
    and NaN padding rows in NaN-poisoned workspaces, against float64; padding rows must come out exactly 0.
    The sweep reaches only the tiles its plans pick; this reaches all of them on a shape they all divide."""
    from moe_plugin_marlin.jit import TILE_CONFIGS
    from moe_plugin_marlin.stage import MarlinExperts

    h, i, e, top_k, rows = 512, 512, 8, 2, 40
    placement = ExpertPlacement.round_robin(e, 2)
    local = placement.local_experts(1, use_map=True, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(11 + (group or 0))
    weights = random_gptq(local.count, h, i, group, dtype, gen)
    hidden = torch.randn((rows, h), device="cuda", generator=gen).to(dtype)
    topw = torch.rand((rows, top_k), device="cuda", generator=gen)
    ids = torch.randint(0, local.count, (rows, top_k), device="cuda", generator=gen, dtype=torch.int32)
    ids[::5, 1] = -1  # non-local slots
    ids[-3:] = -1  # padding rows: no local slot, NaN hidden states that must never be read
    hidden[-3:] = float("nan")
    ref = moe_reference(hidden[:-3].float(), topw[:-3], ids[:-3], weights, torch.float64).double()
    routing = LocalRouting(ids, expert_counts(ids, local.count))
    tested = set()
    for block_m in (16, 32, 64):
        ctx = BuildContext(rank=1, ep_size=2, device=torch.device("cuda"), placement=placement, local=local,
                           hidden_size=h, top_k=top_k, dtype=dtype, max_tokens_per_rank=rows, weights=weights)
        stage = MarlinExperts(ctx, block_m=block_m)
        for cfg in TILE_CONFIGS:
            if cfg.bm != block_m:
                continue
            assert h % cfg.tk == 0 and i % cfg.tk == 0 and h % cfg.tn == 0 and (2 * i) % cfg.tn == 0, cfg
            for splits in (1, 3):
                stage.tile_override = {"gemm1": (cfg.n_warps, 1), "gemm2": (cfg.n_warps, splits)}
                for buf in (stage.inter, stage.slot_out, stage.out):
                    buf.fill_(float("nan"))
                out = stage.compute(hidden, topw, routing).double()
                key = (block_m, cfg.n_warps, splits)
                err = float((out[:-3] - ref).norm() / ref.norm())
                assert bool(out.isfinite().all()) and err < RTOL, (key, err)
                assert bool((out[-3:] == 0).all()), key
                tested.add(cfg)
    assert tested == set(TILE_CONFIGS), set(TILE_CONFIGS) - tested
