"""``hostcore plugins``: installed backends by stage, where they come from, and whether they can run here."""

from __future__ import annotations

import argparse

from ..config import DEFAULTS
from ..contract import Stage
from ..registry import ALLOWLIST_ENV, Registry, get_registry


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list installed backends by stage and whether each can run here")
    p.set_defaults(func=run)


def render(registry: Registry) -> str:
    rows = [("stage", "backend", "distribution", "version", "runs here", "options")]
    for stage in Stage:
        for name in registry.names(stage):
            b = registry.backends[stage][name]
            try:
                reason = b.availability()
            except Exception as exc:  # availability() must not raise; show it rather than crash the listing
                reason = f"availability check failed: {exc}"
            default = " (default)" if DEFAULTS[stage].name == name else ""
            options = ", ".join(f"{k}={o.default}" for k, o in b.options.items())
            rows.append((str(stage), name + default, b.distribution, b.version, "yes" if not reason else f"no: {reason}",
                         options))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 7)
    for failure in registry.failures:
        lines.append(f"FAILED plugin {failure.name!r} ({failure.distribution} {failure.version}): {failure.error}")
    if registry.skipped:
        lines.append(f"skipped by {ALLOWLIST_ENV}: {', '.join(registry.skipped)}")
    missing = [s.value for s in Stage if not registry.names(s)]
    if missing:
        lines.append(f"no backend installed for: {', '.join(missing)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(render(get_registry()))
    return 0
