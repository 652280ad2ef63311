"""`surgery` command line: exit 0 ok, 1 failure, 2 bad input."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from surgery.errors import SurgeryError

from . import commands, narrow


def _demo(args: argparse.Namespace) -> int:
    from surgery.demo import run_demo

    result = run_demo(steps=args.steps, wide=args.wide, seed=args.seed)
    return 0 if result.verify_ok else 1


class _Parser(argparse.ArgumentParser):
    """argparse with the command's error format: one line, exit 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        print(f"surgery: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="surgery",
        description="Go Wide, Then Narrow: insert, train and fold widen/narrow pairs.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True)
    demo = subcommands.add_parser("demo", help="run the whole pipeline on a small built-in ResNet")
    demo.add_argument(
        "--steps", type=int, default=20, help="training steps on synthetic data (default 20)"
    )
    demo.add_argument(
        "--wide", type=float, default=2.0, help="width multiplier of the pairs (default 2)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    commands.register(subcommands)
    narrow.register(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        if isinstance(value, str) and "\x00" in value:
            parser.error(f"--{name.replace('_', '-')} holds a NUL byte: not a path or name")
    try:
        return args.run(args)
    except SurgeryError as error:
        print(f"surgery: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
