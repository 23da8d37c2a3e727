"""Two versions of ``csrc/preprocess.cu``, or two plans, timed against each other in one process, on the same inputs.

A kernel change is judged against the version before it on the same GPU, in the same process, with the
calls interleaved: run-to-run spread between processes (1-3 us at N*K = 8M on an H100) is as large as the
changes being measured. ``--baseline`` is the other version's source file (e.g. from
``git show REV:moe_plugins/cupy_preprocess/moe_plugin_cupy_preprocess/csrc/preprocess.cu``); it must export
the same kernels with the same arguments, and is compiled like the installed one. Both stages plan from the
installed plan.py, each with its own buffers; both results are checked against the torch reference before
any timing. Per size, ``--rounds`` rounds each take `bench_preprocess.median_us` (L2 flushed) of the
baseline and then of the current source; the median over rounds is reported with the ratio, and each version's
time per call in a CUDA graph (`bench_preprocess.graph_us`). ``--path`` plans both on one path (e.g. ``block``).
One JSON line per size. ``--baseline-package DIR`` is a whole copy of the ``moe_plugin_cupy_preprocess`` package
from another commit (its plan.py, launch.py and source together, for a change to the kernels' arguments or
shared-memory layout), imported under another module name; that stage plans with its own plan.py.
``--baseline-plan KEY=VALUE ...`` instead times the installed source against itself,
planned with those `plan_for` options for the baseline: ``staged=false`` (grid_fused without its stage, every
placed slot stored straight to ``sorted``), ``share_lists=false`` (the stage takes the shared memory first).

``--prefill-baseline`` bounds what a store stream costs: the baseline is a source that leaves part of ``sorted``
unwritten (the tail past the total, or the placed slots), and its buffers' ``sorted`` is set to the torch
reference's once before the check, so that the stale entries pass it and every later call. Only for such
experiments: the baseline's own output is then not fully checked. ``--ep`` sets the expert-parallel ranks (8:
32 local experts; 4 and 2: 64 and 128, where grid_fused places 2x and 4x as many slots).

    python3 bench/preprocess/ab_sources.py --baseline /tmp/old_preprocess.cu --sizes 65536 1048576 8388608
    python3 bench/preprocess/ab_sources.py --baseline-plan staged=false --ep 4 --sizes 1048576 8388608
    git archive REV moe_plugins/cupy_preprocess/moe_plugin_cupy_preprocess | tar -x -C /tmp/base
    python3 bench/preprocess/ab_sources.py --baseline-package \
        /tmp/base/moe_plugins/cupy_preprocess/moe_plugin_cupy_preprocess --ep 1 --sizes 8388608
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
from pathlib import Path

import torch
from bench_preprocess import BLOCK_M, EP, append_jsonl, bench_stages, check, graph_us, median_us, routed_ids
from moe_plugin_cupy_preprocess import jit
from moe_plugin_cupy_preprocess.backend import CupyPreprocess
from moe_plugin_cupy_preprocess.buffers import PreprocessBuffers
from moe_plugin_cupy_preprocess.plan import plan_for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    baseline_kind = parser.add_mutually_exclusive_group(required=True)
    baseline_kind.add_argument("--baseline", type=Path, help="the other version of csrc/preprocess.cu")
    baseline_kind.add_argument("--baseline-package", type=Path, metavar="DIR",
                               help="a copy of the moe_plugin_cupy_preprocess package from another commit")
    baseline_kind.add_argument("--baseline-plan", nargs="+", metavar="KEY=VALUE",
                               help="the installed source, planned with these plan_for options (true/false/int)")
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="N*K values")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--path", default="auto", help="the backend's path option for both versions")
    parser.add_argument("--prefill-baseline", action="store_true",
                        help="set the baseline's sorted to the reference's before the check (a baseline that skips "
                             "some of its stores)")
    parser.add_argument("--ep", type=int, default=EP, help=f"expert-parallel ranks (default {EP})")
    parser.add_argument("--out", help="JSON lines file to append to")
    args = parser.parse_args()
    plan_options = dict(parse_option(o) for o in args.baseline_plan or ())

    ctx, current, peer, gen = bench_stages(args.path, args.ep)
    device = torch.cuda.current_device()
    if plan_options:
        baseline = current
    elif args.baseline_package:
        baseline = import_package_copy(args.baseline_package).CupyPreprocess(ctx, path=args.path)
    else:
        baseline = CupyPreprocess(ctx, path=args.path,
                                  kernels=jit.kernels_from_source(device, args.baseline.read_text()))
    for nk in args.sizes:
        ids = routed_ids(nk, int(ctx.sentinel), gen, args.ep)
        want = peer.preprocess(ids, BLOCK_M)
        calls = {}
        for name, stage in (("baseline", baseline), ("current", current)):
            buffers = stage.make_buffers(ids.shape[0], ids.shape[1], BLOCK_M)
            if plan_options and name == "baseline":
                other = plan_for(*ids.shape, ids.dtype, BLOCK_M, ctx.local.count, stage.map, args.path,
                                 stage.kernels.smem_optin, stage.kernels.num_sms,
                                 stage.kernels.fused_occupancy("int32"), max_cluster=stage.max_cluster, **plan_options)
                buffers = PreprocessBuffers.allocate(other, stage.device)
            if args.prefill_baseline and name == "baseline":
                buffers.sorted_slot_ids.copy_(want.aligned.sorted_slot_ids)
            check(stage.preprocess_into(ids, buffers), want)
            calls[name] = (lambda s, b: lambda: s.preprocess_into(ids, b))(stage, buffers)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                times[name].append(median_us(call))
        plan = current.plan(ids.shape[0], ids.shape[1], ids.dtype, BLOCK_M)
        baseline_name = plan_options or str(args.baseline or args.baseline_package)
        row = {"num_slots": nk, "ep": args.ep, "baseline": baseline_name,
               "stage_cap": plan.stage_cap, "stage_type": plan.stage_type, "list_cap": plan.list_cap, "path": plan.path,
               "kernels": list(plan.kernel_names),
               **{f"{name}_us": statistics.median(t) for name, t in times.items()},
               **{f"{name}_rounds_us": t for name, t in times.items()},
               **{f"{name}_graph_us": graph_us(call) for name, call in calls.items()}}
        row["current_over_baseline"] = row["current_us"] / row["baseline_us"]
        row["baseline_prefilled"] = args.prefill_baseline
        print(f"N*K={nk:>8} {row['path']:>5}: baseline {row['baseline_us']:7.2f} us (graph {row['baseline_graph_us']:.2f}), "
              f"current {row['current_us']:7.2f} us (graph {row['current_graph_us']:.2f}), "
              f"ratio {row['current_over_baseline']:.3f}", flush=True)
        append_jsonl(args.out, row)
        del ids, calls
    return 0


def import_package_copy(directory: Path, name: str = "baseline_cupy_preprocess"):
    """The ``backend`` module of the package copy in ``directory``, imported as package ``name`` (its modules import
    each other relatively, so the copy runs its own plan, launch, jit and source)."""
    init = directory / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline-package: {directory} has no __init__.py; give the package directory "
                         "(.../moe_plugin_cupy_preprocess of the other commit)")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(directory)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.backend")


def parse_option(text: str) -> tuple[str, bool | int]:
    """``KEY=VALUE`` of ``--baseline-plan``: VALUE true/false or an int."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--baseline-plan takes KEY=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    try:
        return key, int(value)
    except ValueError:
        raise SystemExit(f"--baseline-plan {key}: expected true, false or an int, got {value!r}") from None


if __name__ == "__main__":
    sys.exit(main())
