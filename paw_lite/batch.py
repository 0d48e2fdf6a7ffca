"""Batch runs over an input file: one input per line, or JSONL with a `text` field. Results are JSONL,
flushed as they are made, so an interrupted run keeps what it finished and a rerun resumes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidFileError, PawError


@dataclass(frozen=True)
class BatchItem:
    index: int  # 0-based line number in the input file
    text: str | None  # None when the line could not be read
    error: str | None = None


def read_inputs(path: Path) -> list[BatchItem]:
    """Every line of the input file; a line that is not UTF-8 (or not valid JSONL) becomes an error item."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidFileError(f"{path}: cannot read the input file: {exc.strerror}") from exc
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    jsonl = path.suffix == ".jsonl" or next((ln.lstrip().startswith(b"{") for ln in lines if ln.strip()), False)
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
            except (ValueError, KeyError, TypeError) as exc:
                items.append(BatchItem(i, None, f"line {i + 1} is not a JSON object with a string 'text' field ({exc})"))
                continue
        items.append(BatchItem(i, text))
    return items


def completed_indices(output: Path) -> set[int]:
    """Indices already in an output file; a torn last line (an interrupted write) is cut off."""
    if not output.exists():
        return set()
    raw = output.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep != len(raw):
        with open(output, "r+b") as f:
            f.truncate(keep)
    done = set()
    for line in raw[:keep].splitlines():
        try:
            done.add(int(json.loads(line)["index"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidFileError(f"{output}: existing line {line[:60]!r} is not a paw-lite result; move the file away to start over") from exc
    return done


def run_batch(items: list[BatchItem], call: Callable[[list[str]], list[str]], write: Callable[[dict], None],
              chunk: int = 16, on_progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Run `call` over the items in chunks, writing one record per item. Returns (ok, failed)."""
    ok = failed = 0
    for start in range(0, len(items), chunk):
        group = items[start:start + chunk]
        good = [it for it in group if it.error is None]
        try:
            outputs = dict(zip((it.index for it in good), call([it.text for it in good]))) if good else {}
            errors: dict[int, str] = {}
        except PawError:
            # one bad input must not cost the others: retry the chunk one input at a time
            outputs, errors = {}, {}
            for it in good:
                try:
                    outputs[it.index] = call([it.text])[0]
                except PawError as exc:
                    errors[it.index] = str(exc)
        for it in group:
            err = it.error or errors.get(it.index)
            if err is None:
                write({"index": it.index, "input": it.text, "output": outputs[it.index]})
                ok += 1
            else:
                write({"index": it.index, "input": it.text, "error": err})
                failed += 1
        if on_progress:
            on_progress(len(group))
    return ok, failed


def jsonl_writer(path: Path | None) -> tuple[Callable[[dict], None], Callable[[], None]]:
    """(write, close) appending JSON lines to path (or stdout), flushed and synced per line."""
    import sys

    f = open(path, "a", encoding="utf-8") if path else sys.stdout

    def write(record: dict) -> None:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        if path:
            os.fsync(f.fileno())

    def close() -> None:
        if path:
            f.close()

    return write, close


def pending(items: list[BatchItem], done: set[int]) -> Iterator[BatchItem]:
    return (it for it in items if it.index not in done)
