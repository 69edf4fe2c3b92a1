"""The `moekit` command line. Each subcommand is a module here with `add_parser(subparsers)` and `run(args)`
that only parses arguments; the work is done in its package."""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from llama.errors import MoekitError

SUBCOMMANDS: tuple[str, ...] = ("upcycle", "verify", "params", "train", "bench")  # module names under moe.cli, in --help order


def _version() -> str:
    try:
        return version("moekit")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Upcycle dense Llama checkpoints into "
                                     "Mixture-of-Experts models, train them, and account for their cost.")
    parser.add_argument("--version", action="version", version=f"moekit {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"moe.cli.{name}")
        p = module.add_parser(sub)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except MoekitError as e:
        if args.debug:
            raise
        print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
