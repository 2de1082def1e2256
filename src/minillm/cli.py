"""`minillm` command line: one subcommand per module in minillm/commands/, whose
`register(subparsers)` adds its parser and sets `func`. Modules import their heavy dependencies
(torch, jax) inside the command, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import minillm.commands
from minillm.checkpoint import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minillm", epilog="Run `minillm COMMAND --help` for the options of one command.",
        description="A small language model from scratch: prepare data, train, sample, chat, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(minillm.commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"minillm.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        # Bad input is the user's to fix: say what is wrong without a traceback.
        print(f"minillm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minillm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
