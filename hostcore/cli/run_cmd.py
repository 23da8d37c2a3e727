"""``hostcore run``: one EP MoE layer forward over several ranks, checked against a dense reference.

Without a launcher it spawns ``--ranks`` CPU processes joined by gloo. Under
``torchrun`` it uses the launcher's ranks, and NCCL with one GPU per rank when
CUDA is available. Each rank draws its own (uneven) tokens and its local
experts' int4 weights from ``--seed``, runs the layer, and compares with a
single-process dense reference of its tokens. Rank 0 prints per rank: tokens,
padding rows, rows per local expert, padding rows misrouted to a local expert,
max error and time per stage. ``--sentinels all`` repeats the forward for every
sentinel strategy, in reproduction mode: unsafe sentinels are allowed and the
torch preprocess runs ``faithful`` (unless ``--backends`` picks a preprocess),
so the padding bug shows next to its fixes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from ..config import BackendChoice, BackendConfig, resolve_config
from ..contract import Stage, sentinel_verdict
from ..errors import ConfigError, HostcoreError
from ..layer import EPMoELayer, StageTrace
from ..placement import ExpertPlacement
from ..registry import get_registry
from ..workload import SHAPES, dense_reference, experts_weights, get_shape, synthetic_router_output, uneven_token_counts

ALL_SENTINELS = ("negative", "out_of_range", "non_local", "guard_slot", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGES = ("prepare", "dispatch", "preprocess", "experts", "combine")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an EP MoE layer over several ranks and check it against a dense reference",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="processes to spawn (ignored under torchrun); default 2")
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="model shape; default tiny")
    p.add_argument("--tokens", type=int, default=8, help="tokens on rank 0, falling to 0 on the last rank; default 8")
    p.add_argument("--tokens-per-rank", help="explicit comma-separated token counts, one per rank (e.g. 8,5,0,3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", help="backend config string (overrides $HOSTCORE_BACKENDS), e.g. "
                                      "'dispatch=torch_a2a,preprocess=torch(mode=checked),sentinel=auto'")
    p.add_argument("--sentinels", help="'all' or a comma-separated list of sentinel strategies to compare")
    p.add_argument("--placement", default="contiguous", choices=("contiguous", "round_robin"))
    p.add_argument("--no-expert-map", action="store_true", help="run without an expert map (contiguous placement)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="activation dtype; default float32 on CPU, bfloat16 on GPU")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda under torchrun when available, else cpu")
    p.add_argument("--json", dest="json_path", help="also write the summary as JSON to this path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    get_shape(args.shape)
    sentinels = _sentinel_list(args.sentinels)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        _check_counts(args, world)
        return _rank_main(int(os.environ["RANK"]), world, args, sentinels, None)
    if args.ranks < 1:
        raise ConfigError(f"--ranks must be >= 1, got {args.ranks}")
    _check_counts(args, args.ranks)
    _placement(args, args.ranks).local_experts(0, _uses_map(args, args.ranks))  # a bad layout fails here
    for stage, choice in resolve_config(args.backends).choices.items():
        get_registry().get(stage, choice.name)  # fail fast on an unknown backend before spawning anything
    if args.ranks == 1:
        return _rank_main(0, 1, args, sentinels, None)
    port = _free_port()
    status = multiprocessing.get_context("spawn").Value("i", 0)  # rank 0's verdict on the whole run
    torch.multiprocessing.start_processes(_spawned, args=(args.ranks, args, sentinels, port, status),
                                          nprocs=args.ranks, start_method="spawn")
    return int(status.value)


def _spawned(rank: int, world: int, args: argparse.Namespace, sentinels: list[str] | None, port: int,
             status: Any) -> None:
    code = _rank_main(rank, world, args, sentinels, port)
    if rank == 0:
        status.value = code


def _rank_main(rank: int, world: int, args: argparse.Namespace, sentinels: list[str] | None, port: int | None) -> int:
    device = _device(args, rank)
    if world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if port is None:  # under torchrun: the launcher's environment says where to rendezvous
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        choices: list[str | None] = list(sentinels) if sentinels else [None]  # None: the configured sentinel
        rows = [_one_config(rank, world, args, device, s) for s in choices]
        if rank == 0:
            _report(args, world, rows)
        return 0 if all(r["ok"] for r in rows) or sentinels else 1
    finally:
        if world > 1:
            dist.destroy_process_group()


def _one_config(rank: int, world: int, args: argparse.Namespace, device: torch.device, sentinel: str | None) -> dict:
    shape = get_shape(args.shape)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = _config_for(args.backends, sentinel)
    placement = _placement(args, world)
    counts = _token_counts(args, world)
    use_map = _uses_map(args, world)
    local_ids = placement.local_experts(rank, use_map).global_ids()
    weights = experts_weights(shape, local_ids, args.seed)
    router = synthetic_router_output(shape, counts[rank], args.seed, rank, dtype)
    result: dict[str, Any] = {"rank": rank, "config": str(config), "dtype": str(dtype)}
    try:
        layer = EPMoELayer(placement, weights, hidden_size=shape.hidden_size, top_k=shape.top_k,
                           max_tokens_per_rank=max(counts), dtype=dtype, rank=rank, device=device,
                           backends=config, use_expert_map=use_map)
        result["sentinel_value"] = layer.sentinel
        result["contract"] = sentinel_verdict(layer.sentinel, shape.num_experts, layer.local.expert_map).reason
        result["contract_ok"] = bool(sentinel_verdict(layer.sentinel, shape.num_experts, layer.local.expert_map))
    except HostcoreError as exc:
        layer, result["error"] = None, f"refused at build: {exc}"
    if not _everyone(layer is not None, world) or layer is None:
        result.setdefault("error", "refused at build on another rank")
        return _gather(result, world, sentinel, config)
    try:
        out, trace = layer.forward_traced(router.hidden.to(device), router.topk_ids.to(device),
                                          router.topk_weights.to(device), rows_per_rank=max(counts))
        ref = dense_reference(router, shape, args.seed, torch.float64)
        err = (out.double().cpu() - ref).abs()
        result["max_abs_err"] = float(err.max()) if err.numel() else 0.0
        result["err_sq"] = float((out.double().cpu() - ref).square().sum())
        result["ref_sq"] = float(ref.square().sum())
        result["trace"] = asdict(trace)
    except HostcoreError as exc:
        result["error"] = f"failed in forward: {exc}"
        result["trace"] = asdict(StageTrace(tokens=counts[rank]))
    return _gather(result, world, sentinel, config)


def _gather(result: dict, world: int, sentinel: str | None, config: BackendConfig) -> dict:
    per_rank: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(per_rank, result)
    else:
        per_rank = [result]
    errors = [r.get("error") for r in per_rank if r.get("error")]
    max_err = max((r.get("max_abs_err", 0.0) for r in per_rank), default=0.0)
    ref_sq = sum(r.get("ref_sq", 0.0) for r in per_rank) or 1.0
    misrouted = sum(r.get("trace", {}).get("misrouted_rows", 0) for r in per_rank)
    rel = (sum(r.get("err_sq", 0.0) for r in per_rank) / ref_sq) ** 0.5
    return {"sentinel": sentinel or config[Stage.SENTINEL].name, "config": str(config),
            "values": [r.get("sentinel_value") for r in per_rank], "max_abs_err": max_err, "rel_err": rel,
            "misrouted_rows": misrouted, "errors": errors, "ranks": per_rank,
            "ok": not errors and misrouted == 0 and rel <= _tolerance(per_rank)}


def _tolerance(per_rank: list[dict]) -> float:
    """||out - ref|| / ||ref|| over all ranks: fp32 outputs match to round-off; bf16/fp16 are rounded once."""
    return 1e-5 if all(r["dtype"] == str(torch.float32) for r in per_rank) else 2e-2


def _report(args: argparse.Namespace, world: int, rows: list[dict]) -> None:
    shape = get_shape(args.shape)
    print(f"hostcore run: shape {shape.name} (H={shape.hidden_size}, I={shape.intermediate_size}, "
          f"E={shape.num_experts}, top-{shape.top_k}), {world} ranks, tokens per rank {_token_counts(args, world)}")
    for row in rows:
        print(f"\n== sentinel={row['sentinel']}  config: {row['config']}")
        header = ("rank", "tokens", "R", "padding", "slots per local expert", "misrouted", "invalid", "max err",
                  *[f"{s} ms" for s in STAGES])
        table = [header]
        for r in row["ranks"]:
            t = r.get("trace", {})
            to = ", ".join(f"local e{e} ({n} slots)" for e, n in t.get("misrouted_to", {}).items())
            table.append((str(r["rank"]), str(t.get("tokens", "")), str(t.get("rows_per_rank", "")),
                          str(t.get("padding_rows", "")), _per_expert(t.get("rows_per_local_expert", [])),
                          f"{t.get('misrouted_rows', '')}" + (f" -> {to}" if to else ""),
                          str(t.get("invalid_ids", "")), f"{r['max_abs_err']:.2e}" if "max_abs_err" in r else "-",
                          *[f"{t.get('stage_ms', {}).get(s, float('nan')):.2f}" for s in STAGES]))
        _print_table(table)
        for r in row["ranks"]:
            if r.get("contract_ok") is False:
                print(f"   rank {r['rank']}: sentinel {r['sentinel_value']} breaks the contract: {r['contract']}")
        for err in dict.fromkeys(row["errors"]):
            print(f"   error: {err}")
    print("\nsummary")
    _print_table([("sentinel", "value per rank", "misrouted rows", "max abs err", "rel err", "ok")] +
                 [(r["sentinel"], str(r["values"]), str(r["misrouted_rows"]), f"{r['max_abs_err']:.2e}",
                   f"{r['rel_err']:.2e}",
                   "yes" if r["ok"] else "NO" + (" (error)" if r["errors"] else "")) for r in rows])
    if args.json_path:
        summary = {"config": {"shape": shape.name, "ranks": world, "tokens_per_rank": _token_counts(args, world),
                              "seed": args.seed, "backends": args.backends, "placement": args.placement},
                   "rows": [{**{k: r[k] for k in ("sentinel", "max_abs_err", "misrouted_rows", "ok", "values",
                                                  "rel_err", "errors", "config")},
                             "ranks": [_rank_summary(rank) for rank in r["ranks"]]} for r in rows]}
        with open(args.json_path, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.json_path}")


def _per_expert(counts: list[int]) -> str:
    """The slot count of every local expert, or a digest when there are too many to read in a table."""
    if len(counts) <= 12:
        return str(counts)
    top = max(range(len(counts)), key=counts.__getitem__)
    return (f"{len(counts)} experts: {sum(counts)} slots, max {counts[top]} (e{top}), "
            f"{counts.count(0)} empty")


def _rank_summary(rank: dict) -> dict:
    trace = rank.get("trace", {})
    keys = ("tokens", "rows_per_rank", "padding_rows", "misrouted_rows", "misrouted_to", "invalid_ids", "stage_ms")
    return {"rank": rank["rank"], **{k: trace.get(k) for k in keys}, "max_abs_err": rank.get("max_abs_err")}


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for c, w in zip(r, widths)))


def _config_for(backends: str | None, sentinel: str | None) -> BackendConfig:
    config = resolve_config(backends)
    if sentinel is None:
        return config
    override = {Stage.SENTINEL: BackendChoice.of(sentinel, allow_unsafe=True)}
    user = BackendConfig.parse(backends) if backends else BackendConfig()
    if Stage.PREPROCESS not in user.choices and config[Stage.PREPROCESS].name == "torch":
        override[Stage.PREPROCESS] = BackendChoice.of("torch", mode="faithful")
    return config.overridden_by(BackendConfig(override))


def _sentinel_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = list(ALL_SENTINELS) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        get_registry().get(Stage.SENTINEL, name)  # raises, listing the installed strategies, for an unknown name
    return names


def _placement(args: argparse.Namespace, world: int) -> ExpertPlacement:
    build = ExpertPlacement.contiguous if args.placement == "contiguous" else ExpertPlacement.round_robin
    return build(get_shape(args.shape).num_experts, world)


def _uses_map(args: argparse.Namespace, world: int) -> bool:
    """An expert map unless ``--no-expert-map``, or a single rank (global ids are local ids there)."""
    return not args.no_expert_map and world > 1


def _token_counts(args: argparse.Namespace, world: int) -> list[int]:
    if args.tokens_per_rank:
        return [int(x) for x in args.tokens_per_rank.split(",")]
    return uneven_token_counts(args.tokens, world)


def _check_counts(args: argparse.Namespace, world: int) -> None:
    try:
        counts = _token_counts(args, world)
    except ValueError:
        raise ConfigError(f"--tokens-per-rank must be comma-separated integers, got {args.tokens_per_rank!r}") from None
    if len(counts) != world or min(counts) < 0:
        raise ConfigError(f"--tokens-per-rank needs {world} non-negative counts (one per rank), got {counts}")


def _device(args: argparse.Namespace, rank: int) -> torch.device:
    want = args.device or ("cuda" if "LOCAL_RANK" in os.environ and torch.cuda.is_available() else "cpu")
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but torch sees no CUDA GPU; drop --device or use --device cpu")
        index = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _everyone(flag: bool, world: int) -> bool:
    if world == 1:
        return flag
    flags: list[Any] = [None] * world
    dist.all_gather_object(flags, flag)
    return all(flags)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
