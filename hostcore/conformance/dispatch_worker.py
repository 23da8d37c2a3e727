"""The per-rank side of `DispatchContract`: runs in each spawned process, records failed checks.

Every rank regenerates every source rank's tokens from the seed, so it knows
exactly what it should receive without extra communication. Each scenario
first runs the collectives (dispatch, then combine), and only then checks, so
a failed check on one rank never leaves another waiting in a collective. The
failures of each check go to ``<outdir>/rank<r>.json``; an unexpected exception
propagates (``torch.multiprocessing.spawn`` reports it with its traceback).

Token identity travels in the router weights: ``topk_weights[t, 0] = (t + 1) / 1024``
(exact in fp32). Hidden states are ``+-0.5, +-1, +-2`` and rank ``d`` returns
its real rows times ``2**d``, so the combined row of a token is its hidden
state times the sum of ``2**d`` over the ranks it went to: exact in every
activation dtype up to 8 ranks, and the factor tells which ranks contributed.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import BackendChoice
from ..contract import PreparedTokens, ReceivedTokens, Stage, check_received
from ..errors import ContractError
from ..hookspecs import BuildContext, OptionValue
from ..placement import ExpertPlacement
from ..registry import Registry
from .base import registry_with
from .data import exact_activations, router_weights
from .layouts import auto_sentinel

CHECKS = ("layout", "tokens", "combine", "phase")
ID_SCALE = 1024.0


@dataclass(frozen=True)
class DispatchSpec:
    """Everything a rank needs (picklable): the backend under test and the test parameters."""

    backend: str
    options: tuple[tuple[str, OptionValue], ...]
    plugin: str | None
    device: str
    ep_size: int
    dist_backend: str
    seed: int
    dtype: str
    hidden_size: int
    top_k: int
    num_experts: int
    placements: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True)
class Scenario:
    """Token counts per source rank, placement kind, map or not, and the ``rows_per_rank`` passed (None: agree)."""

    name: str
    kind: str
    use_map: bool
    counts: tuple[int, ...]
    rows_per_rank: int | None


def scenarios(spec: DispatchSpec) -> list[Scenario]:
    """Uneven token counts, a rank with 0 tokens, explicit and agreed R, map and no map, all ranks empty."""
    rng = random.Random(f"{spec.seed}:dispatch:{spec.ep_size}")
    ep = spec.ep_size
    out = []
    for i, kind in enumerate(spec.placements):
        counts = [rng.randint(1, 9) for _ in range(ep)]
        counts[i % ep] = 0
        out.append(Scenario(f"{kind}, map, one rank without tokens, R agreed", kind, True, tuple(counts), None))
        counts = [rng.randint(0, 9) for _ in range(ep)]
        out.append(Scenario(f"{kind}, map, R = max + 2", kind, True, tuple(counts), max(counts) + 2))
    if "contiguous" in spec.placements:
        counts = [rng.randint(1, 9) for _ in range(ep)]
        out.append(Scenario("contiguous, no map, R = max", "contiguous", False, tuple(counts), max(counts)))
    out.append(Scenario("every rank without tokens, R = 2", spec.placements[0], True, (0,) * ep, 2))
    return out


def placement_of(kind: str, num_experts: int, ep_size: int) -> ExpertPlacement:
    if kind == "contiguous":
        return ExpertPlacement.contiguous(num_experts, ep_size)
    if kind == "round_robin":
        return ExpertPlacement.round_robin(num_experts, ep_size)
    raise ContractError(f"DispatchContract.placements: unknown kind {kind!r}; expected contiguous or round_robin")


def source_tokens(spec: DispatchSpec, index: int, scenario: Scenario, source: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source rank ``source``'s tokens in scenario ``index`` (CPU): hidden, int32 ids (distinct per row), weights."""
    gen = torch.Generator().manual_seed((spec.seed * 1_000_003 + index * 1009 + source) % (2**62))
    t, e, k = scenario.counts[source], spec.num_experts, spec.top_k
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(torch.int32) if t else \
        torch.empty((0, k), dtype=torch.int32)
    hidden = exact_activations(gen, t, spec.hidden_size, getattr(torch, spec.dtype))
    weights = router_weights(gen, t, k)
    weights[:, 0] = (torch.arange(t, dtype=torch.float32) + 1) / ID_SCALE
    return hidden, ids, weights


def destinations(ids: torch.Tensor, owner: tuple[int, ...]) -> list[set[int]]:
    """The set of ranks each token goes to (owners of its experts)."""
    return [{owner[int(e)] for e in row} for row in ids]


def run_rank(rank: int, spec: DispatchSpec, port: int, outdir: str) -> None:
    """Entry point of one spawned rank."""
    torch.set_num_threads(1)
    for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(var, value)  # never NVLink multicast in this project
    if torch.device(spec.device).type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device(spec.device)
    dist.init_process_group(spec.dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=spec.ep_size, timeout=timedelta(seconds=spec.timeout_s))
    failures: dict[str, list[str]] = {check: [] for check in CHECKS}
    try:
        registry = registry_with(Registry.discover(), spec.plugin)
        for index, scenario in enumerate(scenarios(spec)):
            run_scenario(registry, spec, rank, device, index, scenario, failures)
        check_phase(registry, spec, rank, device, failures)
        Path(outdir, f"rank{rank}.json").write_text(json.dumps(failures))
    finally:
        dist.destroy_process_group()


def build(registry: Registry, spec: DispatchSpec, rank: int, device: torch.device,
          scenario: Scenario) -> tuple[Any, ExpertPlacement, int]:
    """The dispatch under test for this rank and scenario, its placement and sentinel (``auto`` semantics)."""
    placement = placement_of(scenario.kind, spec.num_experts, spec.ep_size)
    padding = auto_sentinel(placement.local_experts(rank, scenario.use_map, device))
    ctx = BuildContext(rank=rank, ep_size=spec.ep_size, device=device, placement=placement, local=padding.local,
                       hidden_size=spec.hidden_size, top_k=spec.top_k, dtype=getattr(torch, spec.dtype),
                       max_tokens_per_rank=max(max(scenario.counts), 1), sentinel=padding.sentinel)
    dispatch = registry.build(Stage.DISPATCH, BackendChoice(spec.backend, spec.options), ctx)
    return dispatch, placement, padding.sentinel


def run_scenario(registry: Registry, spec: DispatchSpec, rank: int, device: torch.device, index: int,
                 scenario: Scenario, failures: dict[str, list[str]]) -> None:
    dispatch, placement, sentinel = build(registry, spec, rank, device, scenario)
    where = f"rank {rank}, scenario '{scenario.name}' (tokens per rank {list(scenario.counts)}, sentinel {sentinel})"
    sources = [source_tokens(spec, index, scenario, s) for s in range(spec.ep_size)]
    hidden, ids, weights = sources[rank]
    received = dispatch.dispatch(PreparedTokens(hidden.to(device), ids.to(device), weights.to(device)),
                                 scenario.rows_per_rank)
    expected_rows = [sorted(t for t, dest in enumerate(destinations(src[1], placement.owner)) if rank in dest)
                     for src in sources]
    counts = [len(rows) for rows in expected_rows]
    r = received.topk_ids.shape[1] if received.topk_ids.dim() == 3 else 0
    got = _snapshot(received)
    expert_out = torch.zeros((spec.ep_size, r, spec.hidden_size), dtype=getattr(torch, spec.dtype), device=device)
    for s, n in enumerate(counts):
        if n and n <= r:
            expert_out[s, :n] = received.hidden[s, :n] * (2.0**rank)
    combined = dispatch.combine(expert_out)
    # The collectives are done: check at leisure.
    _check_layout(spec, scenario, received, got, counts, sentinel, where, failures["layout"])
    if not failures["layout"]:
        _check_tokens(sources, expected_rows, got, where, failures["tokens"])
    _check_combine(spec, hidden, ids, placement.owner, combined, where, failures["combine"])


def _snapshot(received: ReceivedTokens) -> ReceivedTokens:
    """Host copies of the received buffers (valid only until combine)."""
    rows = None if received.rows_per_source is None else received.rows_per_source.to("cpu").clone()
    return ReceivedTokens(received.hidden.to("cpu").clone(), received.topk_ids.to("cpu").clone(),
                          received.topk_weights.to("cpu").clone(), received.sentinel, rows)


def _check_layout(spec: DispatchSpec, scenario: Scenario, received: ReceivedTokens, got: ReceivedTokens,
                  counts: list[int], sentinel: int, where: str, out: list[str]) -> None:
    ep, h, k = spec.ep_size, spec.hidden_size, spec.top_k
    ids = got.topk_ids
    if ids.dim() != 3 or ids.shape[0] != ep or ids.shape[2] != k or ids.dtype != torch.int32:
        out.append(f"{where}: topk_ids must be int32 [ep_size={ep}, R, K={k}], got {ids.dtype} {tuple(ids.shape)}")
        return
    r = ids.shape[1]
    if tuple(got.hidden.shape) != (ep, r, h) or got.hidden.dtype != getattr(torch, spec.dtype):
        out.append(f"{where}: hidden must be {spec.dtype} [{ep}, {r}, {h}], got {got.hidden.dtype} {tuple(got.hidden.shape)}")
    if tuple(got.topk_weights.shape) != (ep, r, k) or got.topk_weights.dtype != torch.float32:
        out.append(f"{where}: topk_weights must be float32 [{ep}, {r}, {k}], got {got.topk_weights.dtype} "
                   f"{tuple(got.topk_weights.shape)}")
    if received.topk_ids.device.type != torch.device(spec.device).type:
        out.append(f"{where}: received tensors are on {received.topk_ids.device}, expected {spec.device}")
    if scenario.rows_per_rank is not None and r != scenario.rows_per_rank:
        out.append(f"{where}: R = {r}, but rows_per_rank={scenario.rows_per_rank} was passed")
    if r < max(scenario.counts):
        out.append(f"{where}: R = {r} is below the largest token count {max(scenario.counts)}")
    if received.sentinel != sentinel:
        out.append(f"{where}: ReceivedTokens.sentinel = {received.sentinel}, expected the configured {sentinel}")
    if got.rows_per_source is not None and got.rows_per_source.tolist() != counts:
        out.append(f"{where}: rows_per_source = {got.rows_per_source.tolist()}, expected {counts}")
    if out or max(counts, default=0) > r:
        return
    with_counts = ReceivedTokens(got.hidden, ids, got.topk_weights, sentinel, torch.tensor(counts, dtype=torch.int32))
    try:
        check_received(with_counts, spec.num_experts)
    except ContractError as exc:
        out.append(f"{where}: {exc}")


def _check_tokens(sources: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], expected_rows: list[list[int]],
                  got: ReceivedTokens, where: str, out: list[str]) -> None:
    for s, rows in enumerate(expected_rows):
        hidden, ids, weights = sources[s]
        n = len(rows)
        tag = (got.topk_weights[s, :n, 0] * ID_SCALE).round().to(torch.int64) - 1
        seen = tag.tolist()
        if sorted(seen) != rows:
            missing = sorted(set(rows) - set(seen))
            extra = sorted(t for t in set(seen) if seen.count(t) > 1 or t not in rows)
            out.append(f"{where}: from source rank {s} expected tokens {rows} once each in the real rows, got {seen} "
                       f"(missing {missing}, duplicated or not bound here {extra})")
            continue
        for i, t in enumerate(seen):
            same = (torch.equal(got.topk_ids[s, i], ids[t]) and torch.equal(got.topk_weights[s, i], weights[t])
                    and torch.equal(got.hidden[s, i], hidden[t]))
            if not same:
                out.append(f"{where}: row [{s}, {i}] (token {t} of rank {s}) differs from what rank {s} sent: ids "
                           f"{got.topk_ids[s, i].tolist()} vs {ids[t].tolist()}, or its hidden/weights")
                break


def _check_combine(spec: DispatchSpec, hidden: torch.Tensor, ids: torch.Tensor, owner: tuple[int, ...],
                   combined: torch.Tensor, where: str, out: list[str]) -> None:
    t, h = hidden.shape
    dtype = getattr(torch, spec.dtype)
    if not isinstance(combined, torch.Tensor) or tuple(combined.shape) != (t, h) or combined.dtype != dtype:
        out.append(f"{where}: combine must return {spec.dtype} [T={t}, H={h}], got "
                   f"{getattr(combined, 'dtype', type(combined))} {tuple(getattr(combined, 'shape', ()))}")
        return
    factors = torch.tensor([[float(sum(2**d for d in dest))] for dest in destinations(ids, owner)] or
                           torch.empty((0, 1)), dtype=torch.float32)
    expected = (hidden.to(torch.float32) * factors).to(dtype)
    got = combined.to("cpu")
    if torch.equal(got, expected):
        return
    bad = (got != expected).any(dim=1).nonzero().flatten().tolist()
    t0 = bad[0]
    ratio = (got[t0].to(torch.float32) / hidden[t0].to(torch.float32))
    found = sorted({round(v, 3) for v in ratio.tolist()})[:4]
    want = int(factors[t0, 0])
    out.append(f"{where}: combine wrong for tokens {bad[:8]}: token {t0} went to ranks "
               f"{sorted(destinations(ids[t0:t0 + 1], owner)[0])}, so row = hidden * {want} (sum of 2**rank), "
               f"found hidden * {found}")


def check_phase(registry: Registry, spec: DispatchSpec, rank: int, device: torch.device,
                failures: dict[str, list[str]]) -> None:
    """Dispatch twice without combine must raise (on every rank, before any collective)."""
    scenario = Scenario("dispatch twice", spec.placements[0], True, (3,) * spec.ep_size, 3)
    dispatch, _, _ = build(registry, spec, rank, device, scenario)
    hidden, ids, weights = source_tokens(spec, 999, scenario, rank)
    tokens = PreparedTokens(hidden.to(device), ids.to(device), weights.to(device))
    received = dispatch.dispatch(tokens, 3)
    try:
        received = dispatch.dispatch(tokens, 3)
    except Exception:  # noqa: BLE001, S110 - the expected outcome: any error, raised before communicating
        pass
    else:
        failures["phase"].append(f"rank {rank}: a second dispatch without combine returned normally; it must raise "
                                 "(one-sided dispatches assert on it: the received buffers are still in use)")
    dispatch.combine(torch.zeros_like(received.hidden))
