"""Test cases for a program: what a case holds, how its expected value decides an output, and
reading them from a JSONL cases file or a paw-kit suite file.

A case is `{"input": ..., "expected": ..., "match": ..., "tags": [...]}`. `match` says how the
output is compared with `expected` (MATCH_KINDS; docs/testing-programs.md). A case that cannot be
read becomes an invalid case naming its line, as a bad line of a batch input file becomes an error
record: it costs only itself, and the report counts it."""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from .batch_files import read_inputs  # the batch reader's line rules (BOM, CRLF, one bad line costs only itself)
from .errors import InvalidFileError, PawError, regular_file_size, require

log = logging.getLogger("paw_lite")

MATCH_KINDS = ("exact", "casefold", "json", "regex", "contains")
DEFAULT_MATCH = "exact"
CASE_FIELDS = ("input", "expected", "match", "tags")
SUITE_SUFFIXES = (".yaml", ".yml")
# paw-kit reads suites up to 1 MB; a cases file may be bigger, a suite file never needs to be.
MAX_SUITE_BYTES = 16 * 1024 * 1024


class CaseError(PawError):
    """A case that cannot be checked (a missing field, a bad regex, ...)."""


@dataclass(frozen=True)
class Case:
    """One case. `line` is its 1-based line in the cases file (None for a case made in code);
    `error` says why an invalid case could not be read (it then has no input or expected).
    A valid case is checked when made: CaseError names the field at fault."""

    index: int
    input: str | None
    expected: Any = None
    match: str = DEFAULT_MATCH
    tags: tuple[str, ...] = ()
    line: int | None = None
    error: str | None = None
    # what `match` compares outputs with, built once from `expected` (a compiled regex, parsed JSON)
    _target: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.error is not None:
            return
        if not isinstance(self.input, str):
            raise CaseError(f"'input' is a JSON {_json_type(self.input)}; it must be a string")
        if self.match not in _KINDS:
            raise CaseError(f"'match' is {self.match!r}; it must be one of {', '.join(MATCH_KINDS)}")
        if isinstance(self.tags, list):  # as written in code and in case files
            object.__setattr__(self, "tags", tuple(self.tags))
        if not isinstance(self.tags, tuple) or not all(isinstance(t, str) for t in self.tags):
            raise CaseError("'tags' must be a list of strings, like [\"billing\", \"short\"]")
        object.__setattr__(self, "_target", _KINDS[self.match].prepare(self.expected))

    def decide(self, output: str) -> tuple[bool, str | None]:
        """(passed, why it failed when that is not plain inequality)."""
        if self.error is not None:
            raise ValueError(f"case {self.index} is invalid ({self.error}) and decides nothing")
        return _KINDS[self.match].decide(self._target, output)


def make_case(record: object, index: int, default_match: str = DEFAULT_MATCH, line: int | None = None) -> Case:
    """A case from its JSON object; CaseError names the field at fault and the fix."""
    if not isinstance(record, dict):
        raise CaseError(f"a JSON {_json_type(record)}, not an object like "
                        '{"input": "...", "expected": "..."}')
    unknown = sorted(set(record) - set(CASE_FIELDS), key=str)
    if unknown:
        raise CaseError(f"unknown field {unknown[0]!r} (a case has {', '.join(CASE_FIELDS)}; "
                        f"a misspelt 'match' would silently compare another way)")
    for name in ("input", "expected"):
        if name not in record:
            raise CaseError(f"no {name!r} field")
    tags = record.get("tags", [])
    if not isinstance(tags, list):
        raise CaseError("'tags' must be a list of strings, like [\"billing\", \"short\"]")
    return Case(index, record["input"], record["expected"], record.get("match", default_match),
                tuple(dict.fromkeys(tags)) if all(isinstance(t, str) for t in tags) else tuple(tags), line)


def invalid_case(index: int, line: int | None, error: str, record: object = None) -> Case:
    """A case that could not be read; its input is kept when that much could be (for the report)."""
    text = record.get("input") if isinstance(record, dict) else None
    return Case(index, text if isinstance(text, str) else None, None, DEFAULT_MATCH, (), line, error)


def cases_from_records(records: Iterable[object], default_match: str = DEFAULT_MATCH) -> list[Case]:
    """Cases given in code (dicts or Case objects, kept as they are but for their index). Unlike a
    file's, a bad dict raises CaseError naming it: a program's own data has no line to skip to."""
    check_match(default_match)
    cases = []
    for i, record in enumerate(records):
        if isinstance(record, Case):
            cases.append(record if record.index == i else replace(record, index=i))
            continue
        try:
            cases.append(make_case(record, i, default_match))
        except CaseError as exc:
            raise CaseError(f"case {i}: {exc}") from None
    return cases


def check_match(kind: object) -> None:
    if kind not in _KINDS:
        raise PawError(f"match kind {kind!r} is not one of {', '.join(MATCH_KINDS)}")


def read_cases(path: str | Path, default_match: str = DEFAULT_MATCH) -> list[Case]:
    """The cases of a JSONL cases file (one case a line) or of a paw-kit suite file (.yaml/.yml,
    its `standard_cases`). A case that cannot be read becomes an invalid case naming its line;
    a file that cannot be read at all, or holds no cases, raises InvalidFileError."""
    check_match(default_match)
    path = Path(path).expanduser()
    try:
        regular_file_size(path)
    except OSError as exc:
        raise InvalidFileError(f"{path}: cannot read the cases file: {exc.strerror or exc}") from exc
    cases = _read_suite(path, default_match) if path.suffix.lower() in SUITE_SUFFIXES else _read_jsonl(path, default_match)
    if not cases:
        raise InvalidFileError(f"{path}: holds no cases; write one JSON object a line, like "
                               '{"input": "disk full", "expected": "ALERT"}')
    return cases


def _read_jsonl(path: Path, default_match: str) -> list[Case]:
    items = read_inputs(path, "lines")
    while items and items[-1].text is not None and not items[-1].text.strip():
        items.pop()  # blank lines an editor left after the last case are no cases (one in the middle is)
    cases = []
    for it in items:
        where = f"{path} line {it.index + 1}"
        if it.text is None:  # not UTF-8: the batch reader's message names the line and the byte
            cases.append(invalid_case(it.index, it.index + 1, f"{path}: {it.error}"))
            continue
        try:
            record = _loads(it.text)
        except (ValueError, RecursionError) as exc:
            why = "it is blank" if not it.text.strip() else str(exc)
            cases.append(invalid_case(it.index, it.index + 1, f"{where}: not valid JSON ({why})"))
            continue
        try:
            cases.append(make_case(record, it.index, default_match, it.index + 1))
        except CaseError as exc:
            cases.append(invalid_case(it.index, it.index + 1, f"{where}: {exc}", record))
    return cases


def _read_suite(path: Path, default_match: str) -> list[Case]:
    """paw-kit's suite.yaml (paw_kit/test/suite.py, `TestSuiteConfig`): a mapping whose
    `standard_cases` is a list of {input, expected}. Its other fields (assertions, fuzzing,
    active_learning, abstain_value) are paw-kit's own checks, not read here: a warning says so."""
    yaml = require("yaml", "yaml")
    if regular_file_size(path) > MAX_SUITE_BYTES:
        raise InvalidFileError(f"{path}: a suite file over {MAX_SUITE_BYTES // (1024 * 1024)} MiB is refused; "
                               f"put that many cases in a JSONL cases file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        # Composed first for the line of each case; then built with the safe loader (plain data only).
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except UnicodeDecodeError as exc:
        raise InvalidFileError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except (yaml.YAMLError, RecursionError) as exc:
        raise InvalidFileError(f"{path}: not a valid YAML suite file ({str(exc)[:300]})") from exc
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        raise InvalidFileError(f"{path}: a paw-kit suite file is a YAML mapping with a 'standard_cases' list")
    keys = [k.value for k, _ in root.value if isinstance(k, yaml.ScalarNode)]
    if keys.count("standard_cases") > 1:  # YAML keeps the last one silently: half the suite would never run
        raise InvalidFileError(f"{path}: 'standard_cases' appears {keys.count('standard_cases')} times; merge them into one list")
    if "standard_cases" not in data:
        raise InvalidFileError(f"{path}: has no 'standard_cases' list (the cases paw-lite test reads from a paw-kit suite)")
    records = data["standard_cases"]
    node = next(v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "standard_cases")
    if not isinstance(records, list) or not isinstance(node, yaml.SequenceNode):
        raise InvalidFileError(f"{path}: 'standard_cases' is not a list of {{input, expected}} mappings")
    ignored = sorted(k for k in ("assertions", "fuzzing", "active_learning", "abstain_value") if data.get(k))
    if ignored:
        log.warning("%s: %s %s paw-kit's own and not checked by paw-lite test; only standard_cases are read",
                    path, ", ".join(ignored), "is" if len(ignored) == 1 else "are")
    cases = []
    ignored_fields: set[str] = set()
    for i, (record, item) in enumerate(zip(records, node.value, strict=True)):
        line = item.start_mark.line + 1
        if isinstance(record, dict):  # paw-kit ignores other fields of a case; so does this reader, saying so
            ignored_fields.update(str(k) for k in record if k not in CASE_FIELDS)
            record = {k: v for k, v in record.items() if k in CASE_FIELDS}
        where = f"{path} line {line} (standard_cases[{i}])"
        if isinstance(record, dict) and record.get("expected", None) is None and "input" in record:
            cases.append(invalid_case(i, line, f"{where}: no 'expected' value: paw-kit checks such cases with its "
                                               f"assertions, which paw-lite does not run; give it one or remove it", record))
            continue
        try:
            cases.append(make_case(record, i, default_match, line))
        except CaseError as exc:
            cases.append(invalid_case(i, line, f"{where}: {exc}", record))
    if ignored_fields:
        log.warning("%s: standard_cases fields %s are not read (a case has %s)", path, ", ".join(sorted(ignored_fields)),
                    ", ".join(CASE_FIELDS))
    return cases


# -- match kinds --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    prepare: Callable[[Any], Any]  # expected -> what decide compares with; raises CaseError
    decide: Callable[[Any, str], tuple[bool, str | None]]


def _text(kind: str) -> Callable[[Any], str]:
    def prepare(expected: Any) -> str:
        if not isinstance(expected, str):
            raise CaseError(f"'expected' is a JSON {_json_type(expected)}; with match {kind!r} it must be a string "
                            f"(for a JSON value compared as JSON, use \"match\": \"json\")")
        return expected
    return prepare


def _prepare_contains(expected: Any) -> str:
    text = _text("contains")(expected)
    if not text:
        raise CaseError("an empty 'expected' with match 'contains' passes every output")
    return text


def _prepare_regex(expected: Any) -> re.Pattern[str]:
    pattern = _text("regex")(expected)
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise CaseError(f"'expected' is not a valid regular expression ({exc}); match 'regex' takes a Python "
                        f"regular expression the whole output must match") from None


def _prepare_json(expected: Any) -> Any:
    """A string is JSON text ("{\\"a\\": 1}"); any other value is the JSON value itself ({"a": 1})."""
    if not isinstance(expected, str):
        return expected
    ok, value = _parse_json(expected)
    if not ok:
        raise CaseError(f"'expected' is not JSON text ({value}); with match 'json' a string holds JSON text "
                        f"(a JSON string is written \"\\\"text\\\"\"), or write the value itself")
    return value


def _decide_json(target: Any, output: str) -> tuple[bool, str | None]:
    ok, value = _parse_json(output)
    if not ok:
        return False, f"the output is not JSON ({value})"
    return _same_json(target, value), None


_KINDS: dict[str, _Kind] = {
    "exact": _Kind(lambda e: _text("exact")(e).strip(), lambda t, out: (out.strip() == t, None)),
    "casefold": _Kind(lambda e: _fold(_text("casefold")(e)), lambda t, out: (_fold(out) == t, None)),
    "json": _Kind(_prepare_json, _decide_json),
    "regex": _Kind(_prepare_regex, lambda t, out: (t.fullmatch(out.strip()) is not None, None)),
    "contains": _Kind(_prepare_contains, lambda t, out: (t in out, None)),
}
assert tuple(_KINDS) == MATCH_KINDS


def _fold(text: str) -> str:
    """Case-insensitive comparison form: stripped, NFKC, casefolded (ß and SS are equal)."""
    return unicodedata.normalize("NFKC", text.strip()).casefold()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _loads(text: str) -> Any:
    """JSON with exact numbers (Decimal: 0.1 is 0.1, 1e400 is not infinity) and without NaN or
    Infinity, which are not JSON."""
    return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)


def _parse_json(text: str) -> tuple[bool, Any]:
    try:
        return True, _loads(text)
    except (ValueError, RecursionError) as exc:
        return False, str(exc)[:200]


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: true is not 1, 1 equals 1.0, objects ignore key order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float, Decimal)) and isinstance(b, (int, float, Decimal)):
        return _number(a) == _number(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if a is None or b is None:
        return a is b
    return type(a) is type(b) and isinstance(a, str) and a == b


def _number(x: int | float | Decimal) -> Decimal:
    """A float given in code as the decimal it was written as (0.1, not 0.1000000000000000055...);
    NaN, equal to nothing, compares unequal as a Decimal too."""
    return Decimal(repr(x)) if isinstance(x, float) else Decimal(x)


def _json_type(value: object) -> str:
    names: Mapping[type, str] = {bool: "boolean", int: "number", float: "number", Decimal: "number", str: "string",
                                 list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def json_value(value: Any) -> Any:
    """A case's expected value as plain JSON for a report (its exact Decimal numbers as int or float)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() and abs(value) < 10 ** 300 else float(value)
    if isinstance(value, list):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    return value
