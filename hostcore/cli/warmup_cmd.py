"""``hostcore warmup``: do the slow first-use work of backends (JIT builds, kernel compiles) ahead of time."""

from __future__ import annotations

import argparse
import sys
import time

from ..config import BackendConfig
from ..contract import Stage
from ..errors import ConfigError
from ..hookspecs import Backend
from ..registry import get_registry


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("warmup", help="build/compile backends ahead of first use, with progress")
    p.add_argument("--backends", help="only the backends of this config string (default: every installed "
                                      "backend that has a warm-up and can run here)")
    p.set_defaults(func=run)


def selected(backends: str | None) -> list[Backend]:
    registry = get_registry()
    if backends:
        config = BackendConfig.parse(backends)
        chosen = [registry.get(stage, choice.name) for stage, choice in config.choices.items()]
        without = [f"{b.stage}={b.name}" for b in chosen if b.warm_up is None]
        if without:
            raise ConfigError(f"{', '.join(without)} has no warm-up step (nothing to build ahead of time)")
        return chosen
    return [b for stage in Stage for b in registry.backends[stage].values() if b.warm_up is not None]


def run(args: argparse.Namespace) -> int:
    backends = selected(args.backends)
    if not backends:
        print("no installed backend has a warm-up step")
        return 0
    failed = 0
    for backend in backends:
        label = f"{backend.stage}={backend.name} ({backend.distribution})"
        reason = backend.availability()
        if reason:
            print(f"skip   {label}: cannot run here: {reason}")
            continue
        warm_up = backend.warm_up
        assert warm_up is not None  # `selected` keeps only backends that have one
        print(f"warmup {label} ...", flush=True)
        start = time.perf_counter()
        try:
            summary = warm_up()
        except Exception as exc:  # report every backend, not just the first that fails
            failed += 1
            print(f"FAILED {label} after {time.perf_counter() - start:.1f} s: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            continue
        print(f"done   {label} in {time.perf_counter() - start:.1f} s: {summary}")
    return 1 if failed else 0
