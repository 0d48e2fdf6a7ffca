"""Batch runs over an input file: one input per line, or JSONL with a `text` field.

Results are JSONL, one record per input line (`index` is the 0-based line number; `run` names the
program, interpreter and options that made it), appended and synced to disk as they are made. An
interrupted run therefore keeps what it finished, and a rerun with the same output file skips
those lines: nothing is redone, and nothing written is ever rewritten. Lines that failed are run
again only when asked (`retry_failed`); their new records are appended, and the last record of a
line is the one that counts. The output file is locked while a run writes it, and a rerun checks
that its records were made from the same input lines by the same run, so results from another
input file or another program are never silently mixed in."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import InvalidFileError, PawError

log = logging.getLogger("paw_lite")

INPUT_FORMATS = ("auto", "lines", "jsonl")


@dataclass(frozen=True)
class BatchItem:
    index: int  # 0-based line number in the input file
    text: str | None  # None when the line could not be read
    error: str | None = None


@dataclass(frozen=True)
class Done:
    """What an existing output file says about one input line (its last record)."""

    input: str | None
    failed: bool
    run: str | None  # the `run` field of the record (None in records of paw-lite before it had one)


def read_inputs(path: Path, input_format: str = "auto") -> list[BatchItem]:
    """Every line of the input file; a line that is not UTF-8 (or not valid JSONL) becomes an error
    item, so one bad line costs only itself. Lines end at b"\\n" only: other Unicode line breaks stay
    inside the text, so indices match what `wc -l` and editors count."""
    if input_format not in INPUT_FORMATS:
        raise PawError(f"input format {input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidFileError(f"{path}: cannot read the input file: {exc.strerror}") from exc
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (Windows editors) is not part of the first input
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    jsonl = input_format == "jsonl"
    if input_format == "auto":
        jsonl = path.suffix == ".jsonl" or next((ln.lstrip().startswith(b"{") for ln in lines if ln.strip()), False)
        if jsonl and path.suffix != ".jsonl":
            log.warning("reading %s as JSONL (its first line starts with '{'); pass --input-format lines to read it as text", path)
    if jsonl:  # blank lines an editor left after the last record are no records (one in the middle is an error)
        while lines and not lines[-1].strip():
            lines.pop()
    items = []
    for i, line in enumerate(lines):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            items.append(BatchItem(i, None, f"line {i + 1} is not valid UTF-8 (byte {exc.start})"))
            continue
        if jsonl:
            try:
                record = json.loads(text)
                text = record["text"]
                if not isinstance(text, str):
                    raise TypeError("text is not a string")
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                why = "no 'text' field" if isinstance(exc, KeyError) else str(exc)
                hint = "" if input_format == "jsonl" else "; --input-format lines reads each line as text"
                items.append(BatchItem(i, None, f"line {i + 1} is not a JSON object with a string 'text' field ({why}){hint}"))
                continue
        items.append(BatchItem(i, text))
    return items


def encode_record(record: dict) -> bytes:
    """One JSONL line in UTF-8. Text that cannot be UTF-8 (a lone surrogate from a JSONL escape)
    is written with JSON escapes instead, which read back as the same string."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")


class ResultsFile:
    """An append-only JSONL results file, locked against a second writer while open.

    Opening reads the records already there into `done` (for a line with several records, the last
    one: a retried line's result comes after its error record); a file that does not hold paw-lite
    results is refused untouched. `start`, called once the run is known to go ahead, cuts off a torn
    last line (a record cut by a kill) in place. Nothing already written is ever rewritten."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f: BinaryIO = open(path, "a+b")
        except OSError as exc:
            raise InvalidFileError(f"{path}: cannot open the output file: {exc.strerror}") from exc
        try:
            _lock(self._f, path)
            self._f.seek(0)
            raw = self._f.read()
            self._complete = raw.rfind(b"\n") + 1
            lines, self._torn = raw[:self._complete].splitlines(), raw[self._complete:]
            self._unterminated = False
            if self._torn and _whole_record(self._torn):
                # a record cut just before its newline, or written by a tool that ends files without
                # one: it is complete, so it counts and stays; the next record starts a new line
                lines.append(self._torn)
                self._torn, self._unterminated = b"", True
            self.done: dict[int, Done] = {}
            for n, line in enumerate(lines, 1):
                record = _parse_record(line, n, path)
                self.done[record["index"]] = Done(record.get("input"), "error" in record, record.get("run"))
            if self._torn and not _RECORD_START.startswith(self._torn[:len(_RECORD_START)]):
                raise _not_results(path, len(lines) + 1, self._torn, "not a JSON record")
        except BaseException:
            self._f.close()
            raise

    def start(self) -> None:
        """Cut off the torn last line, if any, or end a complete last line without its newline,
        before new records are appended."""
        if self._torn:
            log.warning("%s: dropping an unfinished last line (%d bytes) left by an interrupted run", self.path, len(self._torn))
            self._f.truncate(self._complete)
        elif self._unterminated:
            self._f.write(b"\n")
            self._unterminated = False

    def write(self, record: dict) -> None:
        self._f.write(encode_record(record))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()  # closing releases the lock


# How every record paw-lite writes starts (see `run_batch`): a torn last line is dropped only if it
# is the beginning of one, so the last line of someone else's file is never cut off.
_RECORD_START = b'{"index": '


def _whole_record(line: bytes) -> bool:
    """A JSON object, not the start of one cut short (which does not parse)."""
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _parse_record(line: bytes, n: int, path: Path) -> dict:
    try:
        record = json.loads(line)
        index = record["index"]
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise TypeError(f"index {index!r}")
        return record
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise _not_results(path, n, line, str(exc)) from exc


def _not_results(path: Path, n: int, line: bytes, why: str) -> InvalidFileError:
    return InvalidFileError(f"{path}: line {n} ({line[:60]!r}) is not a paw-lite result ({why}); the file was left as it "
                           f"is: move it away or pick another --output to start over")


def _lock(f: BinaryIO, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; one writer per output file is up to the user
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise PawError(f"{path}: another paw-lite run is writing this output file; wait for it or pick another --output") from None


def current_records(items: list[BatchItem], done: dict[int, Done]) -> dict[int, Done]:
    """The output's records that are about this input file's inputs. Error records past its last
    input that hold no input text are left out: older paw-lite wrote them for the blank lines after
    the last JSONL record, which are not inputs now (they stay in the file, which is never rewritten)."""
    return {i: d for i, d in done.items() if i < len(items) or not (d.failed and d.input is None)}


def check_resumable(items: list[BatchItem], done: dict[int, Done], output: Path, input_path: Path, run: str,
                    retry_failed: bool = False) -> None:
    """Refuse to resume when the output's records were made from different input lines, or by
    another run (program, interpreter or options: see `run_id`). With retry_failed, a line whose
    record is an error may have changed (fixed in the input file): it runs again."""
    for index, record in done.items():
        if record.run != run:
            raise InvalidFileError(f"{output}: the result for line {index + 1} was made by another program, interpreter or "
                                   f"--max-tokens{'' if record.run else ' (or by an older paw-lite)'}; mixing them would "
                                   f"give results no single run makes: move the output away or pick another --output")
        if index >= len(items):
            raise InvalidFileError(f"{output}: holds a result for line {index + 1}, but {input_path} has {len(items)} inputs: "
                                   f"it was made from another input file; move it away or pick another --output")
        if record.input != items[index].text and not (record.failed and retry_failed):
            hint = "; it failed before: --retry-failed runs such lines again" if record.failed else ""
            raise InvalidFileError(f"{output}: the result for line {index + 1} is for input {record.input!r:.60}, but {input_path} "
                                   f"line {index + 1} now reads {items[index].text!r:.60}{hint}; move the output away or "
                                   f"pick another --output")


def run_id(fingerprint: str, max_tokens: int | None) -> str:
    """The `run` field of a record: the function's fingerprint (program, interpreter) and the options
    that change outputs. Short: it is repeated on every line."""
    return hashlib.sha256(f"{fingerprint}\0{max_tokens}".encode()).hexdigest()[:16]


def stdout_writer() -> Callable[[dict], None]:
    """JSONL records to stdout, as UTF-8 whatever the locale says."""
    out = sys.stdout.buffer

    def write(record: dict) -> None:
        out.write(encode_record(record))
        out.flush()

    return write


# call(texts, on_output) -> outputs; on_output(k, output) as texts[k] finishes, calls never
# overlapping and all made before call returns (as PawFunction.map's on_result).
BatchCall = Callable[[list[str], Callable[[int, str], None] | None], list[str]]


def run_batch(items: list[BatchItem], call: BatchCall, write: Callable[[dict], None],
              chunk: int = 16, on_progress: Callable[[int], None] | None = None, run: str | None = None,
              check: Callable[[str], object] | None = None) -> tuple[int, int]:
    """Run `call` over the items in chunks, writing one record per item (with `run`, see `run_id`)
    in input order, each as soon as it and the records before it are done: an interrupted chunk
    keeps what it finished. `check(text)` raises PawError for an input `call` would refuse (too
    long, ...): such an input gets its error record and the rest of its chunk still runs as one
    batch. Returns (ok, failed)."""
    tag = {} if run is None else {"run": run}
    counts = {"ok": 0, "failed": 0}
    for start in range(0, len(items), chunk):
        group = items[start:start + chunk]
        errors: dict[int, str] = {}
        for it in group:
            if it.error is None and check is not None:
                try:
                    check(it.text)
                except PawError as exc:
                    errors[it.index] = str(exc)
        good = [it for it in group if it.error is None and it.index not in errors]
        outputs: dict[int, str] = {}
        unwritten = list(reversed(group))  # the next record to write is the last entry

        def flush() -> None:
            while unwritten:
                it = unwritten[-1]
                err = it.error or errors.get(it.index)
                if err is None and it.index not in outputs:
                    return
                unwritten.pop()
                if err is None:
                    write({"index": it.index, "input": it.text, "output": outputs[it.index], **tag})
                    counts["ok"] += 1
                else:
                    write({"index": it.index, "input": it.text, "error": err, **tag})
                    counts["failed"] += 1
                if on_progress:
                    on_progress(1)

        def on_output(k: int, output: str, good: list[BatchItem] = good) -> None:
            outputs[good[k].index] = output
            flush()

        try:
            if good:
                for it, output in zip(good, call([it.text for it in good], on_output), strict=True):
                    outputs.setdefault(it.index, output)
        except PawError:
            # one bad input `check` did not catch must not cost the others: one input at a time
            for it in good:
                if it.index not in outputs:
                    try:
                        outputs[it.index] = call([it.text], None)[0]
                    except PawError as exc:
                        errors[it.index] = str(exc)
        flush()
    return counts["ok"], counts["failed"]


def pending(items: list[BatchItem], done: dict[int, Done], retry_failed: bool = False) -> Iterator[BatchItem]:
    """The lines still to run: those without a record, and with retry_failed those whose record is an error."""
    return (it for it in items if it.index not in done or (retry_failed and done[it.index].failed))
