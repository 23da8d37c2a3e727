"""Entry point of the ``hostcore`` command."""

from __future__ import annotations

import argparse
import sys

from ..errors import HostcoreError
from . import plugins_cmd, run_cmd, warmup_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hostcore", description="Expert-parallel MoE backends as plugins.")
    sub = parser.add_subparsers(dest="command", required=True)
    plugins_cmd.add_parser(sub)
    run_cmd.add_parser(sub)
    warmup_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HostcoreError as exc:
        print(f"hostcore {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
