"""The constraint flags of `paw-lite run` and `paw-lite test`: `--choice TEXT` (repeated, one per
choice), `--regex PATTERN` or `--json-schema FILE`, at most one kind (docs/constraints.md).

A constraint is checked in two steps, both before the interpreter evaluates anything: its form
when the command line is read (`from_args`: empty choices, a schema file that is not JSON), and
its compilation against the interpreter's vocabulary once that is loaded (`check`: a regex that
does not parse, a schema llguidance refuses). Either error names the flag it came from."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..constraints import MAX_PATTERN_CHARS, ConstraintError, OutputConstraint
from ..errors import InvalidFileError, regular_file_size

# A schema file may hold indentation and whitespace that its canonical JSON (which MAX_PATTERN_CHARS
# bounds) drops: read up to 4x that, refuse a larger file before reading it.
MAX_SCHEMA_FILE_BYTES = 4 * MAX_PATTERN_CHARS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--choice", action="append", metavar="TEXT",
                       help="constrain the output to one of these: give the flag once per choice (docs/constraints.md)")
    group.add_argument("--regex", metavar="PATTERN",
                       help="constrain the output to a full match of this regex (needs paw-lite[constrain])")
    group.add_argument("--json-schema", type=Path, metavar="FILE",
                       help="constrain the output to JSON valid under the schema in FILE (needs paw-lite[constrain])")


def from_args(args: argparse.Namespace) -> OutputConstraint | None:
    """The constraint the flags ask for (None for none), its form checked."""
    schema = None if args.json_schema is None else _read_schema(args.json_schema)
    with naming_flag(args):
        for text in [*(args.choice or []), *([args.regex] if args.regex is not None else [])]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # argv bytes the locale could not decode
                raise ConstraintError(f"{text!r} holds bytes that are not valid in this terminal's encoding at "
                                      f"character {exc.start}; use a UTF-8 locale (e.g. LANG=C.UTF-8)") from None
        return OutputConstraint.of(choices=args.choice, regex=args.regex, json_schema=schema)


def call_kwargs(constraint: OutputConstraint | None) -> dict[str, Any]:
    """The keywords of `fn(...)` / `fn.map(...)` that ask for the constraint ({} for none)."""
    return {} if constraint is None else constraint.describe()


def check(fn, constraint: OutputConstraint | None, args: argparse.Namespace) -> None:
    """Compile the constraint for a loaded function, so that a bad one is refused before any input
    runs (fn.map compiles it before its first input: with no inputs, that is all it does)."""
    if constraint is not None:
        with naming_flag(args):
            fn.map([], **call_kwargs(constraint))


@contextmanager
def naming_flag(args: argparse.Namespace) -> Iterator[None]:
    """A ConstraintError raised inside says which flag it is about."""
    try:
        yield
    except ConstraintError as exc:
        raise ConstraintError(f"{_flag(args)}: {exc}") from None


def _flag(args: argparse.Namespace) -> str:
    if args.json_schema is not None:
        return f"--json-schema {args.json_schema}"
    return "--regex" if args.regex is not None else "--choice"


def _read_schema(path: Path) -> Any:
    """The JSON value in a --json-schema file (whether it is a usable schema is OutputConstraint's call)."""
    try:
        size = regular_file_size(path)
        if size > MAX_SCHEMA_FILE_BYTES:
            raise InvalidFileError(f"--json-schema {path}: the file is {size} bytes; a schema may be at most "
                                   f"{MAX_SCHEMA_FILE_BYTES}")
        raw = path.read_bytes()
    except InvalidFileError as exc:
        raise InvalidFileError(str(exc) if str(exc).startswith("--json-schema") else f"--json-schema {exc}") from None
    except OSError as exc:
        raise InvalidFileError(f"--json-schema {path}: cannot read the schema file: {exc.strerror}") from None
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise InvalidFileError(f"--json-schema {path}: not UTF-8 text (byte {exc.start}); save the schema as UTF-8 JSON") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidFileError(f"--json-schema {path}: not valid JSON ({exc}); the file must hold one JSON schema "
                               f"object") from None
