"""The `paw-lite` command. Each subcommand lives in its own module with a `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from ..errors import PawError

# Modules under paw_lite.cli that define subcommands, in help order.
COMMAND_MODULES = ["run", "inspect", "compile", "convert", "models", "doctor", "bench"]  # helpers append their module names here


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paw-lite", description="Program-as-Weights on a CPU, offline.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what paw_lite does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="paw-lite: %(message)s")
    try:
        return int(args.func(args) or 0)
    except PawError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        print(f"paw-lite: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paw-lite: interrupted", file=sys.stderr)
        return 130


def emit(args: argparse.Namespace, data: dict, text: str) -> None:
    """Print JSON with --json, else the human-readable text."""
    print(json.dumps(data, ensure_ascii=False) if getattr(args, "json", False) else text)


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """Refuse integer options below 1 (an unset option, None, is left to its default)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PawError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
