"""The `paw-lite` command. Each subcommand lives in its own module with a `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from .. import __version__
from ..errors import PawError

# Modules under paw_lite.cli that define subcommands, in help order.
COMMAND_MODULES = ["run", "test", "inspect", "compile", "convert", "models", "doctor", "bench", "serve"]  # helpers append their module names here


class UsageError(Exception):
    """A command line argparse refuses: (the parser that refused it, the message)."""


class _Parser(argparse.ArgumentParser):
    # argparse prints usage errors and exits on its own; raising instead lets `main` also report
    # them as JSON when --json was given. Subcommand parsers inherit this class.
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paw-lite", description="Program-as-Weights on a CPU, offline.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what paw_lite does")
    parser.add_argument("--version", action="version", version=f"paw-lite {__version__}")
    parser.add_argument("--json", action="store_true", help="machine-readable output (the command's --json, given before it)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    _verbose_everywhere(parser)
    _json_everywhere(parser)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """-v after any command or subcommand too (SUPPRESS: when absent it leaves the value already set)."""
    for command in _subcommands(parser).values():
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what paw_lite does")
        _verbose_everywhere(command)


def _json_everywhere(parser: argparse.ArgumentParser) -> None:
    """--json before a command (or between a command and its subcommand) as after it. argparse copies
    every value a subcommand parser sets over the namespace, its defaults included: a --json default of
    False after the command would undo one given before it, so those defaults are SUPPRESS too (the
    top-level default, False, stands when --json is given nowhere)."""
    for command in _subcommands(parser).values():
        options = [a for a in command._actions if "--json" in a.option_strings]
        for action in options:
            action.default = argparse.SUPPRESS
        if not options and _subcommands(command):  # `models --json list`, as `models -v list`
            command.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        _json_everywhere(command)


def _is_positional(parser: argparse.ArgumentParser, arg: str) -> bool:
    """Whether argparse reads arg as a value rather than an option (it does for "-5" when no option
    looks like a negative number)."""
    try:
        return parser._parse_optional(arg) is None
    except (AttributeError, TypeError):  # a future argparse without this helper
        return not arg.startswith("-")


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, except that `run`'s TEXT may come after options (argparse fills PROGRAM and the
    optional TEXT together, so a later TEXT has no slot: `run p.paw --json "disk full"`)."""
    args, extra = parser.parse_known_args(argv)
    command = _subcommands(parser)[args.command]
    if extra and args.command == "run" and args.text is None:
        rest = extra[1:] if extra[0] == "--" else extra
        if len(rest) == 1 and (rest is not extra or _is_positional(command, rest[0])):
            args.text = rest[0]
            extra = []
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_json = "--json" in argv
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except UsageError as exc:
        refused_by, message = exc.args
        refused_by.print_usage(sys.stderr)
        return _fail(wants_json, f"{refused_by.prog}: error: {message}", message, "UsageError",
                     records_on_stdout=_given(argv, "--input-file") and not _given(argv, "--output"))
    wants_json = bool(getattr(args, "json", False))  # parsed: a TEXT of "--json" after -- is not the option
    # `run --input-file` without --output writes its records to stdout: with --json, its summary and
    # an error go to stderr as one JSON line, so stdout holds records only.
    records_on_stdout = getattr(args, "input_file", None) is not None and not getattr(args, "output", None)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="paw-lite: %(message)s")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at interpreter exit
        return code
    except PawError as exc:
        return _fail(wants_json, f"paw-lite: error: {exc}", str(exc), type(exc).__name__,
                     records_on_stdout=records_on_stdout)
    except KeyboardInterrupt:
        return _fail(wants_json, "paw-lite: interrupted", "interrupted", "KeyboardInterrupt", code=130,
                     records_on_stdout=records_on_stdout)
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): nothing more to say, and nowhere to say it.
        # stdout is pointed at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the pipe
    except OSError as exc:
        # A file or folder the system refused (permissions, a file where a folder must be, a full
        # disk): the commands check their paths up front, this is the net for what they cannot foresee.
        where = f"{exc.filename}: " if exc.filename else ""
        message = f"{where}{exc.strerror or exc}; check that path, or pick another location"
        return _fail(wants_json, f"paw-lite: error: {message}", message, type(exc).__name__,
                     records_on_stdout=records_on_stdout)


def _given(argv: list[str], option: str) -> bool:
    """Whether an option is on a command line argparse refused (so there is no namespace to ask)."""
    return any(a == option or a.startswith(option + "=") for a in argv)


def _fail(wants_json: bool, text: str, message: str, kind: str, code: int = 2, records_on_stdout: bool = False) -> int:
    error = json.dumps({"error": message, "type": kind})
    if wants_json and records_on_stdout:  # stdout holds JSONL records: the error is stderr's JSON line
        print(error, file=sys.stderr)
        return code
    if wants_json:
        try:
            print(error)
        except BrokenPipeError:
            pass
    print(text, file=sys.stderr)
    return code


# Program text and outputs come from strangers: never send their control characters (terminal
# escapes) to a terminal. Tab and newline stay.
_CONTROL = {c: "\ufffd" for c in [*range(0, 9), *range(11, 32), 127, *range(0x80, 0xA0)]}


def printable(text: str | None) -> str:
    return "(none)" if text is None else text.translate(_CONTROL)


def emit(args: argparse.Namespace, data: dict, text: str) -> None:
    """Print JSON with --json, else the human-readable text."""
    print(json.dumps(data, ensure_ascii=False) if getattr(args, "json", False) else text)


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """Refuse integer options below 1 (an unset option, None, is left to its default)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PawError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
