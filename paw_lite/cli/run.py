"""`paw-lite run PROGRAM TEXT` and `paw-lite run PROGRAM --input-file FILE [--output FILE]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .. import batch_files as batch
from ..atomic import check_writable
from ..constraints import OutputConstraint
from ..dask.file_run import DEFAULT_PARTITION_SIZE, cluster_runner  # imports dask itself only when used
from ..errors import PawError
from ..runtime import DEFAULT_BATCH_SIZE, function
from . import constraint_args, emit, printable, require_positive


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a program on one input, or on every line of a file")
    p.add_argument("program", help="a .paw bundle or a program folder")
    p.add_argument("text", nargs="?", help="the input (omit with --input-file)")
    p.add_argument("--input-file", type=Path, help="one input per line, or JSONL with a 'text' field")
    p.add_argument("--output", type=Path, help="JSONL results (default: stdout); an existing file is resumed")
    p.add_argument("--retry-failed", action="store_true",
                   help="on resume, also run again the lines whose records are errors (their new records are appended)")
    p.add_argument("--base-model", help="interpreter GGUF or HF folder: GPT-2 for Compact programs, Qwen3 for Standard ones (default: the program's runtime_id in the models directory)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after N output tokens (default: EOS or context end)")
    p.add_argument("--input-format", choices=batch.INPUT_FORMATS, default="auto",
                   help="how to read --input-file: text lines, JSONL, or auto (JSONL for .jsonl files or when the first line starts with '{')")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"inputs in flight at once in batch mode (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--workers", type=int, default=None,
                   help="threads sharing the inputs in batch mode (default: one per core; 1 leaves NumPy's BLAS threads alone)")
    p.add_argument("--scheduler", help="run the batch on a Dask cluster: its scheduler's address (tcp://HOST:8786), or "
                                       "local:N for N single-threaded worker processes here (needs paw-lite[dask]; docs/dask.md)")
    p.add_argument("--partition-size", type=int, default=None,
                   help=f"inputs per Dask task with --scheduler (default {DEFAULT_PARTITION_SIZE})")
    constraint_args.add_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


# Options that only mean something for a batch run, with their defaults.
_BATCH_ONLY = {"output": None, "retry_failed": False, "input_format": "auto", "batch_size": DEFAULT_BATCH_SIZE, "workers": None,
               "scheduler": None, "partition_size": None}


def run(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.input_file is None):
        raise PawError("give either TEXT or --input-file FILE")
    if args.text is not None:
        given = [f"--{name.replace('_', '-')}" for name, default in _BATCH_ONLY.items() if getattr(args, name) != default]
        if given:
            raise PawError(f"{', '.join(given)} only apply with --input-file; for one TEXT the output is printed")
        try:
            args.text.encode("utf-8")
        except UnicodeEncodeError as exc:  # argv bytes the locale could not decode arrive as lone surrogates
            encoding = sys.getfilesystemencoding()
            fix = ("the input is not valid UTF-8" if encoding.lower().replace("-", "") == "utf8" else
                   "use a UTF-8 locale (e.g. LANG=C.UTF-8)")
            raise PawError(f"TEXT holds bytes that are not valid in this terminal's encoding ({encoding}) at character "
                           f"{exc.start}: {fix}, or put the input in a UTF-8 file for --input-file") from None
    if args.max_tokens is not None and args.max_tokens < 0:
        raise PawError(f"--max-tokens must be >= 0, not {args.max_tokens}")
    require_positive(args, "batch_size", "workers", "partition_size")
    constraint = constraint_args.from_args(args)  # its form; compiled once the interpreter is loaded
    if args.scheduler is None and args.partition_size is not None:
        raise PawError("--partition-size only applies with --scheduler (a run on a Dask cluster)")
    if args.scheduler is not None and args.workers is not None:
        raise PawError("--workers only applies to a local run; with --scheduler each Dask worker's thread count decides")
    items = None
    if args.input_file is not None:  # the input and output files are checked before the interpreter loads
        if args.output and args.output.resolve() == args.input_file.resolve():
            raise PawError(f"--output {args.output} is the input file; results need a file of their own")
        items = batch.read_inputs(args.input_file, args.input_format)
        if args.output and args.output.is_file():  # appended to: only the file itself must be writable
            if not os.access(args.output, os.W_OK):
                raise PawError(f"--output {args.output}: the file is not writable; fix its permissions or pick another --output")
        elif args.output:
            check_writable(args.output, "--output")
    if args.scheduler is not None:  # the program loads on the cluster's workers, not here
        with constraint_args.naming_flag(args), cluster_runner(args, constraint) as (fingerprint, run_todo):
            return _run_file(args, fingerprint, constraint, items, run_todo)
    t0 = time.perf_counter()
    with function(args.program, base_model=args.base_model) as fn:
        load_s = time.perf_counter() - t0
        constraint_args.check(fn, constraint, args)
        if items is None:
            from tqdm import tqdm

            t1 = time.perf_counter()
            # Shown only when a call runs past 2 s (a program that never says EOS runs to the context
            # end, minutes on a slow CPU) and only on a terminal.
            with tqdm(desc="output", unit="token", file=sys.stderr, disable=None, delay=2, leave=False) as bar:
                # A constrained output max_tokens cuts raises IncompleteOutputError: an error, exit 2.
                out = fn(args.text, max_tokens=args.max_tokens, on_tokens=bar.update,
                         **constraint_args.call_kwargs(constraint))
            # On a terminal the output's control characters (GPT-2 can write ESC) are shown as U+FFFD;
            # a pipe gets the exact text.
            emit(args, {"input": args.text, "output": out, "load_s": round(load_s, 3),
                        "call_s": round(time.perf_counter() - t1, 3)}, printable(out) if sys.stdout.isatty() else out)
            return 0
        return _run_file(args, fn.fingerprint, constraint, items, _local_runner(args, fn, constraint))


def _local_runner(args: argparse.Namespace, fn, constraint: OutputConstraint | None):
    """Run pending items in this process through fn.map, with a progress bar over inputs. A cut
    constrained output comes back as its IncompleteOutputError (errors="return"), its input's error
    record; every other input of the chunk keeps its output."""
    kwargs = constraint_args.call_kwargs(constraint)

    def run_todo(todo: list[batch.BatchItem], write, run: str) -> tuple[int, int]:
        from tqdm import tqdm

        with tqdm(total=len(todo), desc="inputs", unit="input", file=sys.stderr, disable=None) as bar:
            return batch.run_batch(todo, lambda texts, on_output: fn.map(
                                       texts, max_tokens=args.max_tokens, batch_size=args.batch_size,
                                       workers=args.workers, on_result=on_output, errors="return", **kwargs),
                                   write, chunk=args.batch_size, on_progress=bar.update, run=run, check=fn.prompt_ids)

    return run_todo


def _run_file(args: argparse.Namespace, fingerprint: str, constraint: OutputConstraint | None,
              items: list[batch.BatchItem], run_todo) -> int:
    """Results go to --output (appended, synced per line; a rerun resumes) or to stdout.
    run_todo(items, write, run) -> (ok, failed) runs the pending items, here or on a Dask cluster."""
    run_id = batch.run_id(fingerprint, args.max_tokens, constraint)
    results = batch.ResultsFile(args.output) if args.output else None
    try:
        done = batch.current_records(items, results.done) if results else {}
        if results:
            batch.check_resumable(items, done, args.output, args.input_file, run_id, args.retry_failed)
            results.start()
        todo = list(batch.pending(items, done, args.retry_failed))
        write = results.write if results else batch.stdout_writer()
        ok, failed = run_todo(todo, write, run_id)
    finally:
        if results:
            results.close()
    failed_records = sum(d.failed for d in done.values())
    retried = failed_records if args.retry_failed else 0
    kept = len(done) - retried  # records this run left standing
    failed_before = failed_records - retried
    summary = {"inputs": len(items), "already_done": kept, "failed_before": failed_before, "retried": retried,
               "ok": ok, "failed": failed, "output": str(args.output) if args.output else None}
    text = f"{ok} done, {failed} failed"
    if kept:
        text += f"; {kept} already in {args.output} ({failed_before} of them failed"
        text += ": --retry-failed runs them again" if failed_before else ""
        text += ")"
    if retried:
        text += f"; {retried} that had failed ran again"
    if args.output:
        emit(args, summary, text)
    else:  # stdout carries the records; with --json the summary on stderr is JSON too, one line
        print(json.dumps(summary) if args.json else text, file=sys.stderr)
    return 1 if failed or failed_before else 0
