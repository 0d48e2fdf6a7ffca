"""Checking a program against cases: `paw_lite.evaluate(program, cases)` runs the program on every
case's input through `fn.map` and returns an EvaluationReport (pass rate, per-tag rates, every case
with its output and verdict); `report.compare(other)` lists where two programs disagree.

The JSON form of a report (`to_json`) is documented in docs/testing-programs.md and versioned by
its `schema` field: a change that breaks a reader gets a new number."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cases import DEFAULT_MATCH, Case, cases_from_records, json_value, read_cases
from .constraints import ConstraintError, IncompleteOutputError
from .errors import PawError

SCHEMA = 1
VERDICTS = ("pass", "fail", "error", "invalid", "not_run")


@dataclass(frozen=True)
class CaseResult:
    """A case and what the program did with it. verdict: pass, fail, error (the program could not
    run on the input: too long for its context, a constrained output cut by max_tokens, ...), invalid (the case could not be read) or
    not_run (the evaluation was interrupted first). reason: why, for error and invalid, and for a
    fail that is not plain inequality (output not JSON)."""

    case: Case
    verdict: str
    output: str | None = None
    reason: str | None = None

    @property
    def done(self) -> bool:
        return self.verdict != "not_run"

    def to_dict(self) -> dict[str, Any]:
        c = self.case
        return {"index": c.index, "line": c.line, "input": c.input, "expected": json_value(c.expected), "match": c.match,
                "tags": list(c.tags), "verdict": self.verdict, "output": self.output, "reason": self.reason}


@dataclass(frozen=True)
class EvaluationReport:
    """What `evaluate` found. `complete` is False after an interruption (the cases not reached are
    `not_run`, and the rates count the cases done)."""

    program: dict[str, Any]  # source, program_id, fingerprint, spec (None for a plain Python function)
    interpreter: dict[str, Any]  # path (None when the function was loaded by the caller), runtime_id
    cases_file: str | None
    options: dict[str, Any]  # match (the default for cases without one), max_tokens, other call options
    results: tuple[CaseResult, ...]
    complete: bool = True
    timings: dict[str, float | None] = field(default_factory=dict)  # load_s, run_s

    def count(self, verdict: str) -> int:
        return sum(r.verdict == verdict for r in self.results)

    @property
    def passed(self) -> int:
        return self.count("pass")

    @property
    def done(self) -> int:
        return sum(r.done for r in self.results)

    @property
    def pass_rate(self) -> float | None:
        """Passed cases over the cases done (invalid and errored ones count as not passed); None
        when none were done."""
        return self.passed / self.done if self.done else None

    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.verdict in ("fail", "error")]

    def invalid(self) -> list[CaseResult]:
        return [r for r in self.results if r.verdict == "invalid"]

    def tag_rates(self) -> dict[str, dict[str, Any]]:
        """Per tag, over the cases done that carry it: {"cases", "passed", "pass_rate"}."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.results:
            if r.done:
                for tag in r.case.tags:
                    entry = out.setdefault(tag, {"cases": 0, "passed": 0})
                    entry["cases"] += 1
                    entry["passed"] += r.verdict == "pass"
        return {tag: {**e, "pass_rate": e["passed"] / e["cases"]} for tag, e in sorted(out.items())}

    def summary(self) -> dict[str, Any]:
        counts = {v: self.count(v) for v in VERDICTS}
        return {"cases": len(self.results), "done": self.done, "passed": counts["pass"], "failed": counts["fail"],
                "errors": counts["error"], "invalid": counts["invalid"], "not_run": counts["not_run"],
                "pass_rate": self.pass_rate}

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        run_s = self.timings.get("run_s")
        ran = sum(r.verdict in ("pass", "fail", "error") for r in self.results)
        return {"schema": SCHEMA, "kind": "paw-lite test report", "paw_lite_version": __version__,
                "program": dict(self.program), "interpreter": dict(self.interpreter), "cases_file": self.cases_file,
                "options": dict(self.options), "complete": self.complete, "summary": self.summary(),
                "tags": self.tag_rates(), "cases": [r.to_dict() for r in self.results],
                "timings": {"load_s": self.timings.get("load_s"), "run_s": run_s,
                            "cases_per_s": round(ran / run_s, 3) if run_s else None}}

    def to_json(self, indent: int | None = None) -> str:
        return dumps(self.to_dict(), indent)

    def compare(self, other: "EvaluationReport") -> "Comparison":
        """Where this program (a) and another (b), run on the same cases, disagree."""
        return Comparison(self, other)


@dataclass(frozen=True)
class Disagreement:
    """A case where two programs gave different outputs. right: a, b, both or neither."""

    a: CaseResult
    b: CaseResult

    @property
    def right(self) -> str:
        a, b = self.a.verdict == "pass", self.b.verdict == "pass"
        return "both" if a and b else "a" if a else "b" if b else "neither"

    def to_dict(self) -> dict[str, Any]:
        case = self.a.to_dict()
        return {**{k: case[k] for k in ("index", "line", "input", "expected", "match", "tags")},
                "a": {k: case[k] for k in ("verdict", "output", "reason")},
                "b": {k: self.b.to_dict()[k] for k in ("verdict", "output", "reason")}, "right": self.right}


@dataclass(frozen=True)
class Comparison:
    """Two programs' reports on the same cases, and the cases where their outputs differ (an error
    on one side and an output on the other differ too). Cases either left not run, or that are
    invalid, are not compared."""

    a: EvaluationReport
    b: EvaluationReport

    def __post_init__(self) -> None:
        ids = [[(r.case.index, r.case.input) for r in rep.results] for rep in (self.a, self.b)]
        if ids[0] != ids[1]:
            raise PawError("the two reports are not on the same cases; evaluate both programs on one case list")

    def disagreements(self) -> list[Disagreement]:
        return [Disagreement(a, b) for a, b in zip(self.a.results, self.b.results)
                if a.done and b.done and a.verdict != "invalid" and _outcome(a) != _outcome(b)]

    def summary(self) -> dict[str, Any]:
        found = self.disagreements()
        compared = sum(a.done and b.done and a.verdict != "invalid" for a, b in zip(self.a.results, self.b.results))
        rights = [d.right for d in found]
        return {"compared": compared, "disagree": len(found), "a_right": rights.count("a"),
                "b_right": rights.count("b"), "both_right": rights.count("both"), "neither_right": rights.count("neither")}

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {"schema": SCHEMA, "kind": "paw-lite test comparison", "paw_lite_version": __version__,
                "a": self.a.to_dict(), "b": self.b.to_dict(), "summary": self.summary(),
                "disagreements": [d.to_dict() for d in self.disagreements()]}

    def to_json(self, indent: int | None = None) -> str:
        return dumps(self.to_dict(), indent)


def _outcome(r: CaseResult) -> tuple[str | None, bool]:
    return r.output, r.verdict == "error"


class EvaluationInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a KeyboardInterrupt from a callback) during `evaluate`: `.report` holds the cases
    done by then. A KeyboardInterrupt, so code that stops on Ctrl-C still stops."""

    def __init__(self, report: EvaluationReport):
        super().__init__(f"interrupted after {report.done} of {len(report.results)} cases")
        self.report = report


def dumps(data: dict, indent: int | None = None) -> str:
    """JSON text; a lone surrogate (from a JSON escape in a cases file) is written escaped."""
    try:
        text = json.dumps(data, ensure_ascii=False, indent=indent)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(data, ensure_ascii=True, indent=indent)


# -- running --------------------------------------------------------------------------------------

Cases = str | os.PathLike[str] | Iterable[Case | Mapping[str, Any]]


def load_cases(cases: Cases, match: str = DEFAULT_MATCH) -> tuple[list[Case], str | None]:
    """(the cases, the file they came from)."""
    if isinstance(cases, (str, os.PathLike)):
        path = Path(cases).expanduser()
        return read_cases(path, match), str(path)
    if isinstance(cases, (bytes, Mapping)):
        raise TypeError(f"cases must be a path or a list of cases, not {type(cases).__name__}")
    found = cases_from_records(cases, match)
    if not found:
        raise PawError("no cases to evaluate")
    return found, None


def evaluate(program: Any, cases: Cases, *, match: str = DEFAULT_MATCH, max_tokens: int | None = None,
             base_model: str | os.PathLike[str] | None = None, batch_size: int | None = None,
             workers: int | None = None, call_options: Mapping[str, Any] | None = None,
             cache_dir: str | os.PathLike[str] | None = None,
             on_case: Callable[[CaseResult], None] | None = None) -> EvaluationReport:
    """Run a program on every case's input and decide each output by the case's match kind.

    program: a .paw file or program folder, a Program, a `paw_lite.function` (used as is, not
    closed), or any Python function from str to str (called one input at a time).
    cases: a JSONL cases file, a paw-kit suite file (.yaml), or a list of dicts / Case objects
    ({"input": ..., "expected": ..., "match": ..., "tags": [...]}). A file's unreadable cases
    are `invalid` results naming their line; a bad case in a list raises CaseError.
    match: the match kind of cases that name none. max_tokens, batch_size, workers: as fn.map's.
    call_options: other keywords every call gets (as fn.map(texts, **call_options)): a constraint
    (choices=, regex= or json_schema=), whose cut outputs are `error` cases; one that cannot be
    used raises ConstraintError before any case runs.
    on_case(result): called once per case as its verdict is known (from fn.map's worker; calls
    never overlap). A KeyboardInterrupt there, or Ctrl-C, raises EvaluationInterrupted holding
    the report of the cases done."""
    if on_case is not None and not callable(on_case):
        raise TypeError(f"on_case must be a function taking a CaseResult, or None; got {type(on_case).__name__}")
    case_list, cases_file = load_cases(cases, match)
    options = {"match": match, "max_tokens": max_tokens, **(call_options or {})}
    call = {k: v for k, v in {"max_tokens": max_tokens, **(call_options or {})}.items() if v is not None}
    map_options = {k: v for k, v in {"batch_size": batch_size, "workers": workers}.items() if v is not None}
    from . import PawFunction, Program, function

    started = time.perf_counter()
    if isinstance(program, PawFunction) or (callable(program) and not isinstance(program, (str, os.PathLike, Program))):
        given = [name for name, value in (("base_model", base_model), ("cache_dir", cache_dir)) if value is not None]
        if given:  # a loaded function has its interpreter and cache already
            raise TypeError(f"{' and '.join(given)} only apply when evaluate loads the program (a path or a Program), "
                            f"not to a function already loaded")
        fn, owned, interpreter_path = program, False, None
    else:
        from . import paths

        prog = program.checked() if isinstance(program, Program) else Program.load(program)
        interpreter_path = paths.resolve_interpreter(base_model, prog.runtime_id)
        fn, owned = function(prog, base_model=interpreter_path, cache_dir=cache_dir), True
    load_s = time.perf_counter() - started if owned else None
    try:
        describe = _describe(fn, interpreter_path)
        runner = _Runner(fn, case_list, call, map_options, on_case)
        t0 = time.perf_counter()

        def report(complete: bool) -> EvaluationReport:
            return EvaluationReport(*describe, cases_file, options, runner.results(), complete,
                                    {"load_s": _round(load_s), "run_s": _round(time.perf_counter() - t0)})
        try:
            runner.run()
        except KeyboardInterrupt as exc:
            raise EvaluationInterrupted(report(False)) from exc
        return report(True)
    finally:
        if owned:
            fn.close()


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _describe(fn: Any, interpreter_path: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(program, interpreter) fields of the report."""
    prog = getattr(fn, "program", None)
    if prog is None:  # a plain Python function
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        return ({"source": f"<python function {name}>", "program_id": None, "fingerprint": None, "spec": None},
                {"path": None, "runtime_id": None})
    return ({"source": str(prog.source), "program_id": prog.program_id, "fingerprint": getattr(fn, "fingerprint", None),
             "spec": prog.spec},
            {"path": None if interpreter_path is None else str(interpreter_path), "runtime_id": prog.meta.get("runtime_id")})


class _Runner:
    """Runs the valid cases through fn.map (a plain function: one call each) and keeps each
    verdict as it comes, so an interruption still has every case done so far."""

    def __init__(self, fn: Any, cases: list[Case], call: dict[str, Any], map_options: dict[str, Any],
                 on_case: Callable[[CaseResult], None] | None):
        self.fn, self.cases, self.call, self.map_options, self.on_case = fn, cases, call, map_options, on_case
        self._done: dict[int, CaseResult] = {}
        self._lock = threading.Lock()  # fn.map's on_result calls never overlap; a plain function's loop has one thread
        # A program's function raises PawError for an input it cannot run (anything else is a bug and
        # propagates); a plain Python function may raise anything, and the case records it.
        self._input_errors: tuple[type[BaseException], ...] = (PawError,) if hasattr(fn, "prompt_ids") else (Exception,)

    def results(self) -> tuple[CaseResult, ...]:
        with self._lock:
            return tuple(self._done.get(i) or CaseResult(c, "not_run") for i, c in enumerate(self.cases))

    def _record(self, k: int, output: str | PawError | None, error: str | None = None) -> None:
        case = self.cases[k]
        if isinstance(output, IncompleteOutputError):  # fn.map(..., errors="return"): its own message counts map inputs
            output, error = None, (f"the output was cut after {len(output.ids)} tokens before it was complete (partial "
                                   f"output {output.partial!r}); raise max_tokens (--max-tokens)")
        elif isinstance(output, PawError):
            output, error = None, str(output)
        if case.error is not None:
            result = CaseResult(case, "invalid", None, case.error)
        elif error is not None:
            result = CaseResult(case, "error", None, error)
        elif not isinstance(output, str):
            result = CaseResult(case, "error", None, f"the function returned {type(output).__name__}, not str")
        else:
            passed, why = case.decide(output)
            result = CaseResult(case, "pass" if passed else "fail", output, why)
        with self._lock:
            if k in self._done:
                return
            self._done[k] = result
        if self.on_case is not None:
            self.on_case(result)

    def run(self) -> None:
        todo = []
        check = getattr(self.fn, "prompt_ids", None)  # a PawFunction refuses an input too long before any work
        for k, case in enumerate(self.cases):
            if case.error is not None:
                self._record(k, None)
                continue
            if check is not None:
                try:
                    check(case.input)
                except PawError as exc:
                    self._record(k, None, str(exc))
                    continue
            todo.append(k)
        if not todo:
            return
        if not hasattr(self.fn, "map"):
            for k in todo:
                self._one(k)
            return
        texts = [self.cases[k].input for k in todo]
        # A program's function hands back a cut constrained output as its IncompleteOutputError
        # (an error case) and goes on with the other inputs.
        returned = {"errors": "return"} if check is not None else {}
        try:
            outputs = self.fn.map(texts, **self.call, **self.map_options, **returned,
                                  on_result=lambda j, out: self._record(todo[j], out))
        except ConstraintError:
            raise  # the constraint itself, not one case: every case would fail alike
        except PawError:
            # An input the check above did not catch must not cost the others: one at a time.
            for k in todo:
                if k not in self._done:
                    self._one(k)
            return
        for k, out in zip(todo, outputs, strict=True):
            self._record(k, out)  # each one already recorded by on_result is left as it is

    def _one(self, k: int) -> None:
        try:
            output = self.fn(self.cases[k].input, **self.call)
        except self._input_errors as exc:
            self._record(k, None, f"{type(exc).__name__}: {exc}" if not isinstance(exc, PawError) else str(exc))
            return
        self._record(k, output)
