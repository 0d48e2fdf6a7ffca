"""`paw-lite test PROGRAM CASES`: the program's pass rate on cases, its failures and per-tag rates;
`--against OTHER` also runs another program and lists where the two disagree."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import unicodedata
from pathlib import Path

from .. import paths
from ..cases import DEFAULT_MATCH, MATCH_KINDS, Case, json_value, read_cases
from ..errors import PawError
from ..evaluate import CaseResult, Comparison, EvaluationInterrupted, EvaluationReport, evaluate
from ..program import Program
from . import constraint_args, printable, require_positive

FAILURES_SHOWN = 30


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("test", help="check a program against cases: pass rate, failures, per-tag rates")
    p.add_argument("program", help="a .paw bundle or a program folder")
    p.add_argument("cases", type=Path, help="JSONL cases, one a line: {\"input\": ..., \"expected\": ..., \"match\": ..., "
                                            "\"tags\": [...]}; or a paw-kit suite file (.yaml)")
    p.add_argument("--against", metavar="OTHER", help="also run this program on the cases and list where the two disagree")
    p.add_argument("--match", choices=MATCH_KINDS, default=DEFAULT_MATCH,
                   help=f"how cases without a 'match' field compare (default {DEFAULT_MATCH}: equal after stripping)")
    p.add_argument("--min-pass-rate", metavar="R", type=_rate, default=None,
                   help="exit with status 1 when the pass rate is below R (0.9, or 90%%): a gate for CI")
    p.add_argument("--base-model", help="interpreter GGUF or HF folder: GPT-2 for Compact programs, Qwen3 for Standard ones (default: the program's runtime_id in the models directory)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop each output after N tokens (default: EOS or context end)")
    p.add_argument("--batch-size", type=int, default=None, help="inputs in flight at once (default: fn.map's)")
    p.add_argument("--workers", type=int, default=None, help="threads sharing the inputs (default: one per core)")
    constraint_args.add_arguments(p)
    p.add_argument("--show", type=int, default=FAILURES_SHOWN, metavar="N",
                   help=f"show at most N failures or disagreements (default {FAILURES_SHOWN}; --json has them all)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON (schema: docs/testing-programs.md)")
    p.set_defaults(func=run)


def _rate(text: str) -> float:
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate: give a fraction from 0 to 1 (0.9) or a percentage (90%)")
    return value


def call_options(args: argparse.Namespace) -> dict:
    """Keywords every call of the program gets besides max_tokens: the constraint flags (--choice,
    --regex, --json-schema) as fn.map's choices=, regex= or json_schema= (the schema as a dict).
    They reach the report's options too."""
    return constraint_args.call_kwargs(constraint_args.from_args(args))


def run(args: argparse.Namespace) -> int:
    if args.max_tokens is not None and args.max_tokens < 0:
        raise PawError(f"--max-tokens must be >= 0, not {args.max_tokens}")
    if args.show < 0:
        raise PawError(f"--show must be >= 0, not {args.show}")
    require_positive(args, "batch_size", "workers")
    options = call_options(args)  # a bad constraint (or schema file) shows before anything loads
    cases = read_cases(args.cases, args.match)  # a bad cases file shows before any program loads
    # Both programs and their interpreters are found before either runs: a wrong --against path must
    # not show only after the first program's run.
    programs = [Program.load(name) for name in [args.program] + ([args.against] if args.against else [])]
    for program in programs:
        paths.resolve_interpreter(args.base_model, program.runtime_id)
    reports: list[EvaluationReport] = []
    interrupted = False
    for program in programs:  # one loaded at a time
        try:
            with constraint_args.naming_flag(args):  # a regex the interpreter cannot compile, before any case
                reports.append(_evaluate(program, cases, args, options))
        except EvaluationInterrupted as exc:
            reports.append(exc.report)
            interrupted = True
            break
    if len(reports) == 2:
        comparison = Comparison(*reports)
        print(comparison.to_json() if args.json else _comparison_text(comparison, args.show))
    else:
        print(reports[0].to_json() if args.json else _report_text(reports[0], args.show))
    if interrupted:
        print(f"paw-lite: interrupted: {reports[-1].program['source']} ran {reports[-1].done} of {len(cases)} cases",
              file=sys.stderr)
        return 130
    rate = reports[0].pass_rate or 0.0
    if args.min_pass_rate is not None and rate < args.min_pass_rate:
        print(f"paw-lite: pass rate {rate:.1%} is below --min-pass-rate {args.min_pass_rate:.1%}", file=sys.stderr)
        return 1
    invalid = len(reports[0].invalid())
    if invalid:
        print(f"paw-lite: {invalid} case{'s' if invalid != 1 else ''} of {args.cases} could not be read (listed above); "
              f"fix {'them' if invalid != 1 else 'it'}", file=sys.stderr)
        return 1
    return 0


def _evaluate(program: Program, cases: list[Case], args: argparse.Namespace, options: dict) -> EvaluationReport:
    named = str(args.cases)  # the cases were read once, in `run`: the report names their file
    with progress_bar(len(cases), Path(program.source).name) as bar:
        try:
            report = evaluate(program, cases, match=args.match, max_tokens=args.max_tokens, base_model=args.base_model,
                              batch_size=args.batch_size, workers=args.workers, call_options=options,
                              on_case=lambda result: bar.update(1))
        except EvaluationInterrupted as exc:
            raise EvaluationInterrupted(dataclasses.replace(exc.report, cases_file=named)) from exc
    return dataclasses.replace(report, cases_file=named)


def progress_bar(total: int, desc: str):
    """A bar on stderr (shown on a terminal only) that counts cases as they are decided."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="case", file=sys.stderr, disable=None, leave=False)


# -- text output ----------------------------------------------------------------------------------


def rate_line(report: EvaluationReport) -> str:
    """`tiny.paw: 7/10 passed (70.0%); 1 error, 2 invalid`."""
    s = report.summary()
    rate = "n/a" if s["pass_rate"] is None else f"{s['pass_rate']:.1%}"
    text = f"{report.program['source']}: {s['passed']}/{s['done']} passed ({rate})"
    extra = [f"{s[k]} {word}{'s' if s[k] != 1 and word == 'error' else ''}"
             for k, word in (("errors", "error"), ("invalid", "invalid"), ("not_run", "not run")) if s[k]]
    return text + ("; " + ", ".join(extra) if extra else "")


def _report_text(report: EvaluationReport, show: int) -> str:
    lines = [rate_line(report)]
    if not report.complete:
        lines[0] += f" (interrupted: {report.done} of {len(report.results)} cases done)"
    lines += _invalid_lines(report)
    failures = report.failures()
    if failures and show:
        lines += ["", f"failures ({len(failures)}):"]
        rows = [[_where(r.case), _cell(r.case.input), _expected_cell(r.case), _got(r)] for r in failures[:show]]
        lines += _table(["line", "input", "expected", "got"], rows)
        if len(failures) > show:
            lines.append(f"... and {len(failures) - show} more (--show N, or --json for all)")
    tags = report.tag_rates()
    if tags:
        lines += ["", "by tag:"]
        lines += _table(["tag", "passed", "rate"], [[_cell(t), f"{e['passed']}/{e['cases']}", f"{e['pass_rate']:.1%}"]
                                                    for t, e in tags.items()])
    return "\n".join(lines)


def _comparison_text(comparison: Comparison, show: int) -> str:
    a, b = comparison.a, comparison.b
    lines = [f"a = {rate_line(a)}", f"b = {rate_line(b)}"]
    for rep in (a, b):
        if not rep.complete:
            lines.append(f"{rep.program['source']} was interrupted: {rep.done} of {len(rep.results)} cases done")
    lines += _invalid_lines(a)
    s = comparison.summary()
    lines += ["", f"they disagree on {s['disagree']} of {s['compared']} cases: a right on {s['a_right']}, "
                  f"b right on {s['b_right']}, both on {s['both_right']}, neither on {s['neither_right']}"]
    found = comparison.disagreements()
    if found and show:
        rows = [[_where(d.a.case), _cell(d.a.case.input), _expected_cell(d.a.case), _got(d.a), _got(d.b), d.right]
                for d in found[:show]]
        lines += _table(["line", "input", "expected", "a got", "b got", "right"], rows)
        if len(found) > show:
            lines.append(f"... and {len(found) - show} more (--show N, or --json for all)")
    return "\n".join(lines)


def _invalid_lines(report: EvaluationReport) -> list[str]:
    bad = report.invalid()
    return ["", f"cases that could not be read ({len(bad)}):", *(f"  {printable(r.reason)}" for r in bad)] if bad else []


def _where(case: Case) -> str:
    return str(case.line if case.line is not None else case.index)


def _expected_cell(case: Case) -> str:
    text = case.expected if isinstance(case.expected, str) else json.dumps(json_value(case.expected), ensure_ascii=False)
    return _cell(text if case.match == DEFAULT_MATCH else f"{case.match}: {text}")


def _got(result: CaseResult) -> str:
    if result.verdict == "error":
        return _cell(f"error: {result.reason}")
    return _cell(result.output) if result.output else "(empty)"


def _cell(text: str | None) -> str:
    """One line: newlines and tabs written as \\n and \\t, terminal control characters replaced."""
    text = "" if text is None else text
    return printable(text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t"))


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1 for c in text)


def _trim(text: str, width: int) -> str:
    if _width(text) <= width:
        return text + " " * (width - _width(text))
    out, used = [], 0
    for c in text:
        w = _width(c)
        if used + w > width - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "…" + " " * (width - 1 - used)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Rows padded into columns that fit the terminal: the widest columns give way first."""
    total = shutil.get_terminal_size((100, 24)).columns - 2 - 2 * (len(header) - 1)
    wants = [max(_width(r[i]) for r in [header, *rows]) for i in range(len(header))]
    widths = _fit(wants, max(total, 4 * len(header)))
    return ["  " + "  ".join(_trim(c, w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def _fit(wants: list[int], total: int) -> list[int]:
    """Column widths summing to at most total: every column gets what it wants when all fit;
    otherwise the narrow ones keep theirs and the rest share what is left equally."""
    widths = [0] * len(wants)
    left, open_ = total, sorted(range(len(wants)), key=lambda i: wants[i])
    while open_:
        share = left // len(open_)
        i = open_[0]
        if wants[i] <= share:
            widths[i] = wants[i]
            left -= wants[i]
            open_.pop(0)
        else:
            for j in open_:
                widths[j] = max(share, 1)
            break
    return widths
