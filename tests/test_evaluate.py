"""`paw-lite test` and `paw_lite.evaluate` on the tiny random program: pass rates are exactly the
share of cases whose expected value is the program's own output (found one input at a time, the
oracle), every match kind decides as docs/testing-programs.md says, `--against` finds exactly the
inputs where two programs' outputs differ, bad case lines cost only themselves, and Ctrl-C (a
KeyboardInterrupt raised from a callback after N results) leaves the report of the cases done."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import paw_lite
from paw_lite.cases import Case, CaseError, read_cases
from paw_lite.cli import main
from paw_lite.evaluate import EvaluationInterrupted

from conftest import make_program, random_lora

MAX_TOKENS = 4
INPUTS = ["disk full on /var", "user alice logged in", "kernel panic - not syncing", "ok", "ünïcödé ✓",
          "backup finished", "cpu at 100%", "\nleading newline", "a <|endoftext|> b", "ssh login failed",
          "1 2 3", "all good"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def fn(tiny_program, tiny_gguf, cache):
    with paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=cache) as f:
        yield f


@pytest.fixture(scope="module")
def outputs(fn) -> list[str]:
    """The oracle: the program's output for each input, one call at a time."""
    return [fn(t, max_tokens=MAX_TOKENS) for t in INPUTS]


@pytest.fixture(scope="module")
def other_program(tmp_path_factory) -> Path:
    """A second tiny program: the same LoRA at a slightly smaller scale (alpha 15.75 against 16), so
    the two agree on some inputs and not on others (4 of the 12 differ here)."""
    return make_program(tmp_path_factory.mktemp("other") / "other.paw", random_lora(2, 64, 32), 15.75, "f32")


@pytest.fixture(scope="module")
def other_outputs(other_program, tiny_gguf, cache) -> list[str]:
    with paw_lite.function(other_program, base_model=tiny_gguf, cache_dir=cache) as f:
        return [f(t, max_tokens=MAX_TOKENS) for t in INPUTS]


@pytest.fixture(autouse=True)
def private_cache(cache, monkeypatch):
    monkeypatch.setenv("PAW_LITE_CACHE", str(cache))


def write_cases(path: Path, records: list[dict | str | bytes]) -> Path:
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)).encode()
             for r in records]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


RIGHT = {0, 2, 3, 5, 8, 11}  # cases whose expected value is the program's own output


def half_right_cases(outputs: list[str]) -> list[dict]:
    return [{"input": t, "expected": out if i in RIGHT else out + " (not it)",
             "tags": ["right" if i in RIGHT else "wrong", "all"] + (["short"] if len(t) < 6 else [])}
            for i, (t, out) in enumerate(zip(INPUTS, outputs))]


# -- pass rate ------------------------------------------------------------------------------------


def test_pass_rate_is_exactly_the_share_of_cases_whose_expected_is_the_own_output(fn, outputs, tmp_path):
    assert len(set(outputs)) > len(INPUTS) // 2, "the tiny program should give varied outputs"
    cases = write_cases(tmp_path / "cases.jsonl", half_right_cases(outputs))
    report = paw_lite.evaluate(fn, cases, max_tokens=MAX_TOKENS)
    assert report.complete and report.pass_rate == len(RIGHT) / len(INPUTS)
    assert [r.output for r in report.results] == outputs  # fn.map's outputs, identical to one at a time
    assert [r.verdict for r in report.results] == ["pass" if i in RIGHT else "fail" for i in range(len(INPUTS))]
    assert [r.case.line for r in report.results] == list(range(1, len(INPUTS) + 1))
    short = [i for i, t in enumerate(INPUTS) if len(t) < 6]
    assert report.tag_rates() == {
        "all": {"cases": 12, "passed": 6, "pass_rate": 0.5},
        "right": {"cases": 6, "passed": 6, "pass_rate": 1.0},
        "short": {"cases": len(short), "passed": len(RIGHT & set(short)), "pass_rate": len(RIGHT & set(short)) / len(short)},
        "wrong": {"cases": 6, "passed": 0, "pass_rate": 0.0}}
    assert not fn.program.source.startswith("<") and report.program["fingerprint"] == fn.fingerprint


def test_a_program_path_is_loaded_run_and_closed(tiny_program, tiny_gguf, outputs, tmp_path):
    cases = write_cases(tmp_path / "cases.jsonl", half_right_cases(outputs))
    report = paw_lite.evaluate(tiny_program, cases, max_tokens=MAX_TOKENS, base_model=tiny_gguf, workers=1, batch_size=3)
    assert [r.output for r in report.results] == outputs and report.passed == len(RIGHT)
    assert report.interpreter == {"path": str(tiny_gguf), "runtime_id": "gpt2-q8_0"}
    assert report.timings["load_s"] > 0 and report.cases_file == str(cases)


def test_an_input_the_program_cannot_run_is_an_error_case_and_costs_nothing_else(fn, outputs):
    cases = [{"input": INPUTS[0], "expected": outputs[0]}, {"input": "word " * 400, "expected": "x"},
             {"input": "\ud800 lone surrogate", "expected": "x"}, {"input": INPUTS[1], "expected": outputs[1]}]
    report = paw_lite.evaluate(fn, cases, max_tokens=MAX_TOKENS)
    assert [r.verdict for r in report.results] == ["pass", "error", "error", "pass"]
    assert "context holds" in report.results[1].reason and "not valid Unicode" in report.results[2].reason
    assert report.pass_rate == 0.5
    json.loads(report.to_json())  # the lone surrogate is written escaped


def test_options_of_loading_are_refused_with_a_loaded_function(fn, tiny_gguf):
    with pytest.raises(TypeError, match="base_model only apply when evaluate loads the program"):
        paw_lite.evaluate(fn, [{"input": "a", "expected": "b"}], base_model=tiny_gguf)


def test_a_plain_python_function_is_called_one_input_at_a_time():
    def upper(text: str) -> str:
        if text == "boom":
            raise ValueError("no")
        return 5 if text == "five" else text.upper()

    report = paw_lite.evaluate(upper, [{"input": "a", "expected": "A"}, {"input": "boom", "expected": "B"},
                                       {"input": "five", "expected": "5"}, {"input": "b", "expected": "b"}])
    assert [r.verdict for r in report.results] == ["pass", "error", "error", "fail"]
    assert report.results[1].reason == "ValueError: no" and "returned int" in report.results[2].reason
    assert report.program["source"].startswith("<python function") and report.timings["load_s"] is None


# -- match kinds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("match, expected, output, passed", [
    ("exact", " ALERT \n", "ALERT", True), ("exact", "ALERT", "ALERT.", False), ("exact", "alert", "ALERT", False),
    ("exact", "", "", True),
    ("casefold", "Alert", "  aLERT ", True), ("casefold", "STRASSE", "straße", True), ("casefold", "ALERT", "QUIET", False),
    ("casefold", "ﬁle", "FILE", True),  # NFKC: the ligature is f + i
    ("json", '{"a": 1, "b": [true, null]}', '{"b": [true, null], "a": 1.0}', True),
    ("json", {"a": 1}, '{"a":1}', True), ("json", [1, 2], "[2, 1]", False),
    ("json", "1", "true", False), ("json", "true", "1", False), ("json", "0", "false", False),
    ("json", "0.1", "0.10", True), ("json", 0.1, "0.1", True), ("json", "1e400", "1e500", False),
    ("json", '"ALERT"', '"ALERT"', True), ("json", '"ALERT"', "ALERT", False), ("json", "null", "null", True),
    ("json", "{}", "{} trailing", False),
    ("regex", r"AL(ERT|ARM)", "ALARM", True), ("regex", r"ALERT", "ALERT!", False), ("regex", r"ALERT", "AN ALERT", False),
    ("regex", r"(?i)alert", " ALERT ", True), ("regex", r"\d+ items?", "3 items", True),
    ("contains", "ERT", "ALERT!", True), ("contains", "ert", "ALERT", False), ("contains", " x", "a x", True),
])
def test_every_match_kind_decides_as_documented(match, expected, output, passed):
    assert Case(0, "input", expected, match).decide(output)[0] is passed


def test_a_json_case_says_when_the_output_is_not_json():
    passed, reason = Case(0, "i", "{}", "json").decide("{oops")
    assert not passed and reason.startswith("the output is not JSON (Expecting property name")
    assert Case(0, "i", "x", tags=["a", "b"]).tags == ("a", "b")
    assert Case(0, "i", "1", "json").decide("NaN")[0] is False  # not JSON, though Python's json reads it


def test_match_kinds_decide_the_programs_outputs(fn, outputs, tmp_path):
    """Each kind built from the real outputs: right where the docs say a case passes, wrong elsewhere."""
    out = outputs
    cases = [
        {"input": INPUTS[0], "expected": f"  {out[0]}  "},  # exact after strip
        {"input": INPUTS[1], "expected": out[1].swapcase(), "match": "casefold"},
        {"input": INPUTS[2], "expected": out[2].swapcase()},  # exact: case matters
        {"input": INPUTS[3], "expected": re.escape(out[3][:2]) + ".*", "match": "regex"},
        {"input": INPUTS[4], "expected": re.escape(out[4][:2]), "match": "regex"},  # must match all of it
        {"input": INPUTS[5], "expected": out[5][1:3], "match": "contains"},
        {"input": INPUTS[6], "expected": out[6] + "!", "match": "contains"},
        {"input": INPUTS[7], "expected": json.dumps(out[7]), "match": "json"},  # the output is no JSON text
    ]
    assert all(len(o) > 2 and o.swapcase() != o for o in out[:8])
    path = write_cases(tmp_path / "kinds.jsonl", cases)
    report = paw_lite.evaluate(fn, path, max_tokens=MAX_TOKENS)
    assert [r.verdict for r in report.results] == ["pass", "pass", "fail", "pass", "fail", "pass", "fail", "fail"]
    assert report.results[7].reason.startswith("the output is not JSON")
    # --match sets the kind of cases that name none
    casefold = write_cases(tmp_path / "cf.jsonl", [{"input": INPUTS[2], "expected": out[2].swapcase()}])
    assert paw_lite.evaluate(fn, casefold, match="casefold", max_tokens=MAX_TOKENS).results[0].verdict == "pass"


# -- bad cases ------------------------------------------------------------------------------------


BAD_LINES = [
    (b"{\"input\": \"a\", \"expected\": \"A\"", "line 1: not valid JSON"),
    (b"[\"a\", \"A\"]", "line 2: a JSON array, not an object"),
    (b"{\"input\": \"a\"}", "line 3: no 'expected' field"),
    (b"{\"expected\": \"a\"}", "line 4: no 'input' field"),
    (b"{\"input\": \"a\", \"expected\": \"(unclosed\", \"match\": \"regex\"}", "line 5: 'expected' is not a valid regular expression"),
    (b"{\"input\": \"a\", \"expected\": \"A\", \"macth\": \"regex\"}", "line 6: unknown field 'macth'"),
    (b"{\"input\": \"a\", \"expected\": \"A\", \"match\": \"fuzzy\"}", "line 7: 'match' is 'fuzzy'; it must be one of"),
    (b"{\"input\": \"\xff\xfe\", \"expected\": \"A\"}", "line 8 is not valid UTF-8 (byte 11)"),
    (b"", "line 9: not valid JSON (it is blank)"),
    (b"{\"input\": \"a\", \"expected\": \"{nope\", \"match\": \"json\"}", "line 10: 'expected' is not JSON text"),
    (b"{\"input\": \"a\", \"expected\": \"A\", \"tags\": \"billing\"}", "line 11: 'tags' must be a list of strings"),
    (b"{\"input\": 5, \"expected\": \"A\"}", "line 12: 'input' is a JSON number; it must be a string"),
    (b"{\"input\": \"a\", \"expected\": 5}", "line 13: 'expected' is a JSON number; with match 'exact' it must be a string"),
    (b"{\"input\": \"a\", \"expected\": \"\", \"match\": \"contains\"}", "line 14: an empty 'expected' with match 'contains'"),
    (b"{\"input\": \"a\", \"expected\": NaN}", "line 15: not valid JSON (NaN is not a JSON value)"),
]


def test_bad_case_lines_are_named_and_cost_only_themselves(fn, outputs, tmp_path, capsys, tiny_program, tiny_gguf):
    good = [{"input": INPUTS[0], "expected": outputs[0]}, {"input": INPUTS[1], "expected": "wrong"}]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join([line for line, _ in BAD_LINES] + [json.dumps(c).encode() for c in good])
                     + b"\r\n\n  \n")  # a BOM, a CRLF, and blank lines after the last case: none of them is a case
    report = paw_lite.evaluate(fn, path, max_tokens=MAX_TOKENS)
    n = len(BAD_LINES)
    assert len(report.results) == n + 2
    for result, (_, message) in zip(report.results, BAD_LINES):
        assert result.verdict == "invalid" and result.reason.startswith(f"{path}") and message in result.reason, result.reason
    assert [r.verdict for r in report.results[n:]] == ["pass", "fail"] and report.results[n].case.line == n + 1
    assert report.pass_rate == 1 / (n + 2)

    rc = main(["test", str(tiny_program), str(path), "--base-model", str(tiny_gguf), "--max-tokens", str(MAX_TOKENS)])
    captured = capsys.readouterr()
    assert rc == 1, captured.err  # the run finished; the file needs fixing
    assert f"cases that could not be read ({n}):" in captured.out and "line 5: 'expected' is not a valid" in captured.out
    assert f"{n} cases of {path} could not be read" in captured.err


def test_a_bad_case_given_in_code_raises_naming_it(fn):
    with pytest.raises(CaseError, match=r"case 1: no 'expected' field"):
        paw_lite.evaluate(fn, [{"input": "a", "expected": "b"}, {"input": "a"}])
    with pytest.raises(CaseError, match=r"'expected' is not a valid regular expression"):
        Case(0, "a", "(", "regex")


def test_a_missing_or_empty_cases_file_is_refused_before_the_program_loads(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    for name, message in (("missing.jsonl", "cannot read the cases file"), ("empty.jsonl", "holds no cases")):
        rc = main(["test", str(tmp_path / "no-such.paw"), str(tmp_path / name), "--json"])
        error = json.loads(capsys.readouterr().out)
        assert rc == 2 and message in error["error"] and error["type"] == "InvalidFileError"


# -- paw-kit suites -------------------------------------------------------------------------------


SUITE = """\
task_name: log_triage
spec: "Classify a log line as ALERT or QUIET."
adapter_path: ./triage.paw
standard_cases:
  - input: "disk full on /var"
    expected: "{a0}"
  - {{input: "user alice logged in", expected: "wrong"}}
  - input: "kernel panic - not syncing"
  - input: "ok"
    expected: "{a3}"
    notes: "paw-kit ignores fields it does not know"
assertions:
  - rule: regex_match
    pattern: "^(ALERT|QUIET)$"
"""


def test_a_paw_kit_suites_standard_cases_are_read(fn, outputs, tmp_path, caplog):
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE.format(a0=outputs[0].replace('"', '\\"'), a3=outputs[3].replace('"', '\\"')), encoding="utf-8")
    cases = read_cases(path)
    assert [(c.line, c.input, c.error is None) for c in cases] == [
        (5, INPUTS[0], True), (7, INPUTS[1], True), (8, INPUTS[2], False), (9, INPUTS[3], True)]
    assert "line 8 (standard_cases[2]): no 'expected' value" in cases[2].error
    assert "assertions is paw-kit's own and not checked" in caplog.text
    assert "standard_cases fields notes are not read" in caplog.text
    report = paw_lite.evaluate(fn, path, max_tokens=MAX_TOKENS)
    assert [r.verdict for r in report.results] == ["pass", "fail", "invalid", "pass"]


def test_reading_a_suite_without_pyyaml_names_the_extra(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "suite.yaml"
    path.write_text("standard_cases: []\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now raises ImportError
    with pytest.raises(paw_lite.MissingDependencyError, match=re.escape("pip install 'paw-lite[yaml]'")):
        read_cases(path)


@pytest.mark.parametrize("text, message", [
    ("standard_cases: []\nstandard_cases: [{input: a, expected: b}]\n", "'standard_cases' appears 2 times"),
    ("task_name: x\n", "has no 'standard_cases' list"),
    ("standard_cases: {input: a}\n", "'standard_cases' is not a list"),
    ("- a\n- b\n", "a YAML mapping"),
    ("standard_cases: [\n", "not a valid YAML suite file"),
])
def test_a_suite_that_is_not_paw_kits_shape_is_refused(tmp_path, text, message):
    path = tmp_path / "suite.yml"
    path.write_text(text)
    with pytest.raises(paw_lite.PawError, match=re.escape(message)):
        read_cases(path)


# -- --against ------------------------------------------------------------------------------------


def test_against_finds_exactly_the_cases_where_two_programs_differ(tiny_program, other_program, tiny_gguf, outputs,
                                                                  other_outputs, tmp_path, capsys):
    differ = {i for i, (a, b) in enumerate(zip(outputs, other_outputs)) if a != b}
    assert 0 < len(differ) < len(INPUTS), "the two programs should agree on some inputs and not on others"
    # expected: a's output on even cases, b's on odd ones
    expected = [a if i % 2 == 0 else b for i, (a, b) in enumerate(zip(outputs, other_outputs))]
    path = write_cases(tmp_path / "cases.jsonl", [{"input": t, "expected": e} for t, e in zip(INPUTS, expected)])
    rc = main(["test", str(tiny_program), str(path), "--against", str(other_program), "--base-model", str(tiny_gguf),
               "--max-tokens", str(MAX_TOKENS), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [d["index"] for d in data["disagreements"]] == sorted(differ)
    assert [d["right"] for d in data["disagreements"]] == ["a" if i % 2 == 0 else "b" for i in sorted(differ)]
    assert [(d["a"]["output"], d["b"]["output"]) for d in data["disagreements"]] == [
        (outputs[i], other_outputs[i]) for i in sorted(differ)]
    assert data["summary"] == {"compared": 12, "disagree": len(differ), "a_right": sum(i % 2 == 0 for i in differ),
                               "b_right": sum(i % 2 == 1 for i in differ), "both_right": 0, "neither_right": 0}
    assert [c["output"] for c in data["a"]["cases"]] == outputs and [c["output"] for c in data["b"]["cases"]] == other_outputs

    rc = main(["test", str(tiny_program), str(path), "--against", str(other_program), "--base-model", str(tiny_gguf),
               "--max-tokens", str(MAX_TOKENS)])
    text = capsys.readouterr().out
    assert rc == 0 and f"they disagree on {len(differ)} of 12 cases" in text
    assert text.splitlines()[0].startswith(f"a = {tiny_program}: ") and text.splitlines()[1].startswith(f"b = {other_program}: ")


# -- exit status and the report's schema ------------------------------------------------------------


@pytest.mark.parametrize("gate, code", [(None, 0), ("0.5", 0), ("50%", 0), ("0.51", 1), ("60%", 1), ("0", 0), ("1", 1)])
def test_min_pass_rate_sets_the_exit_status(tiny_program, tiny_gguf, outputs, tmp_path, capsys, gate, code):
    path = write_cases(tmp_path / "cases.jsonl", half_right_cases(outputs))
    rc = main(["test", str(tiny_program), str(path), "--base-model", str(tiny_gguf), "--max-tokens", str(MAX_TOKENS),
               *(["--min-pass-rate", gate] if gate else [])])
    captured = capsys.readouterr()
    assert rc == code and captured.out.startswith(f"{tiny_program}: 6/12 passed (50.0%)")
    assert ("is below --min-pass-rate" in captured.err) is (code == 1)


@pytest.mark.parametrize("gate", ["1.5", "-0.1", "abc", "150%"])
def test_a_min_pass_rate_that_is_not_a_rate_is_a_usage_error(tmp_path, capsys, gate):
    rc = main(["test", "p.paw", str(tmp_path / "c.jsonl"), "--min-pass-rate", gate, "--json"])
    error = json.loads(capsys.readouterr().out)
    assert rc == 2 and error["type"] == "UsageError" and "is not a rate" in error["error"]


REPORT_KEYS = {"schema", "kind", "paw_lite_version", "program", "interpreter", "cases_file", "options", "complete",
               "summary", "tags", "cases", "timings"}
CASE_KEYS = {"index", "line", "input", "expected", "match", "tags", "verdict", "output", "reason"}


def test_the_json_report_schema_is_pinned(tiny_program, tiny_gguf, outputs, tmp_path, capsys):
    """These keys are the documented schema 1 (docs/testing-programs.md): changing them breaks readers."""
    path = write_cases(tmp_path / "cases.jsonl", half_right_cases(outputs) + [{"input": "x", "expected": 1, "match": "json"}])
    rc = main(["test", str(tiny_program), str(path), "--base-model", str(tiny_gguf), "--max-tokens", str(MAX_TOKENS),
               "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert set(data) == REPORT_KEYS and data["schema"] == 1 and data["kind"] == "paw-lite test report"
    assert data["paw_lite_version"] == paw_lite.__version__
    assert set(data["program"]) == {"source", "program_id", "fingerprint", "spec"}
    assert data["program"]["source"] == str(tiny_program) and len(data["program"]["fingerprint"]) == 64
    assert data["interpreter"] == {"path": str(tiny_gguf), "runtime_id": "gpt2-q8_0"}
    assert data["cases_file"] == str(path) and data["options"] == {"match": "exact", "max_tokens": MAX_TOKENS}
    assert data["complete"] is True
    assert data["summary"] == {"cases": 13, "done": 13, "passed": 6, "failed": 7, "errors": 0, "invalid": 0,
                               "not_run": 0, "pass_rate": 6 / 13}
    assert set(data["tags"]) == {"all", "right", "short", "wrong"}
    assert all(set(t) == {"cases", "passed", "pass_rate"} for t in data["tags"].values())
    assert all(set(c) == CASE_KEYS for c in data["cases"])
    assert data["cases"][0] == {"index": 0, "line": 1, "input": INPUTS[0], "expected": outputs[0], "match": "exact",
                                "tags": ["right", "all"], "verdict": "pass", "output": outputs[0], "reason": None}
    assert data["cases"][12]["expected"] == 1 and data["cases"][12]["reason"].startswith("the output is not JSON")
    assert set(data["timings"]) == {"load_s", "run_s", "cases_per_s"} and data["timings"]["run_s"] > 0


def test_the_comparison_schema_is_pinned(fn, outputs):
    cases = [{"input": t, "expected": o} for t, o in zip(INPUTS[:3], outputs)]
    a = paw_lite.evaluate(fn, cases, max_tokens=MAX_TOKENS)
    b = paw_lite.evaluate(lambda t: "same" if t == INPUTS[1] else "other", cases)
    data = json.loads(a.compare(b).to_json())
    assert set(data) == {"schema", "kind", "paw_lite_version", "a", "b", "summary", "disagreements"}
    assert data["schema"] == 1 and data["kind"] == "paw-lite test comparison" and set(data["a"]) == REPORT_KEYS
    assert set(data["summary"]) == {"compared", "disagree", "a_right", "b_right", "both_right", "neither_right"}
    assert all(set(d) == {"index", "line", "input", "expected", "match", "tags", "a", "b", "right"}
               for d in data["disagreements"])
    assert [d["index"] for d in data["disagreements"]] == [0, 1, 2] and data["disagreements"][0]["a"] == {
        "verdict": "pass", "output": outputs[0], "reason": None}


# -- Ctrl-C ---------------------------------------------------------------------------------------


def interrupt_after(n: int):
    seen = []

    def on_case(result) -> None:
        seen.append(result)
        if len(seen) == n:
            raise KeyboardInterrupt

    return on_case, seen


def test_ctrl_c_leaves_the_report_of_the_cases_done(fn, outputs):
    cases = half_right_cases(outputs)
    on_case, seen = interrupt_after(5)
    with pytest.raises(EvaluationInterrupted) as caught:
        paw_lite.evaluate(fn, cases, max_tokens=MAX_TOKENS, workers=1, on_case=on_case)
    assert isinstance(caught.value, KeyboardInterrupt)
    report = caught.value.report
    done = [r for r in report.results if r.done]
    assert not report.complete and report.done == 5 and len(done) == 5
    assert {r.case.index for r in done} == {r.case.index for r in seen}
    for r in done:  # each one decided as in a full run
        i = r.case.index
        assert r.output == outputs[i] and r.verdict == ("pass" if i in RIGHT else "fail")
    assert report.pass_rate == sum(r.case.index in RIGHT for r in done) / 5
    assert all(r.verdict == "not_run" and r.output is None for r in report.results if not r.done)
    assert report.summary()["not_run"] == 7

    # With a worker per core the interrupt may come from another thread, and that worker's peers may
    # finish an input before they stop: every case reported done is one on_case saw, decided right.
    on_case, seen = interrupt_after(5)
    with pytest.raises(EvaluationInterrupted) as caught:
        paw_lite.evaluate(fn, cases, max_tokens=MAX_TOKENS, workers=2, on_case=on_case)
    done = [r for r in caught.value.report.results if r.done]
    assert len(done) >= 5 and {r.case.index for r in done} == {r.case.index for r in seen}
    assert all(r.output == outputs[r.case.index] for r in done)


def test_ctrl_c_in_the_command_prints_the_partial_report(tiny_program, tiny_gguf, outputs, tmp_path, capsys, monkeypatch):
    import paw_lite.cli.test as test_cli

    class Bar:  # the progress bar's update is called once per case decided: Ctrl-C at the stop_at-th of all bars
        seen = 0

        def __init__(self, total, desc):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, k):
            Bar.seen += k
            if Bar.seen == Bar.stop_at:
                raise KeyboardInterrupt

    monkeypatch.setattr(test_cli, "progress_bar", Bar)
    Bar.stop_at = 3
    path = write_cases(tmp_path / "cases.jsonl", half_right_cases(outputs))
    args = ["test", str(tiny_program), str(path), "--base-model", str(tiny_gguf), "--max-tokens", str(MAX_TOKENS),
            "--workers", "1"]
    rc = main([*args, "--json"])
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert rc == 130 and data["complete"] is False and data["summary"]["done"] == 3 and data["summary"]["not_run"] == 9
    assert data["cases_file"] == str(path) and "ran 3 of 12 cases" in captured.err
    Bar.seen = 0
    rc = main(args)
    out = capsys.readouterr().out
    assert rc == 130 and "; 9 not run (interrupted: 3 of 12 cases done)" in out.splitlines()[0]

    # --against, interrupted while the second program runs: both reports, the second one partial
    Bar.seen, Bar.stop_at = 0, 12 + 4
    rc = main([*args, "--against", str(tiny_program), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 130 and data["kind"] == "paw-lite test comparison"
    assert data["a"]["complete"] is True and data["b"]["complete"] is False and data["b"]["summary"]["done"] == 4
    assert data["summary"]["compared"] == 4 and data["disagreements"] == []  # the same program twice


# -- the text report ------------------------------------------------------------------------------


def test_a_cell_is_one_line_without_control_characters():
    from paw_lite.cli.test import _cell, _trim, _width

    assert _cell("a\tb\nc\r\\n \x1b[2J \x07") == "a\\tb\\nc\\r\\\\n \ufffd[2J \ufffd"
    assert _width("界a") == 3 and _trim("界界界", 4) == "界… " and _trim("abc", 5) == "abc  "


def test_the_failure_table_fits_the_terminal(tiny_program, tiny_gguf, outputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    cases = [{"input": "tab\there\nnewline \x1b[2J " + "long " * 30, "expected": "界" * 40}] + half_right_cases(outputs)
    path = write_cases(tmp_path / "cases.jsonl", cases)
    rc = main(["test", str(tiny_program), str(path), "--base-model", str(tiny_gguf), "--max-tokens", str(MAX_TOKENS),
               "--show", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    table = out[out.index("failures (7):"):out.index("by tag:")].splitlines()[1:-1]
    from paw_lite.cli.test import _width

    assert table[0].split() == ["line", "input", "expected", "got"] and len(table) == 1 + 3 + 1
    assert all(_width(line) <= 60 for line in table), table
    assert table[1].startswith("  1     tab\\there\\n") and "…  界界界" in table[1] and table[1].endswith("…")
    assert "\x1b" not in out and table[-1] == "... and 4 more (--show N, or --json for all)"
    short = [i for i, t in enumerate(INPUTS) if len(t) < 6]
    short_passed = len(RIGHT & set(short))
    assert out.splitlines()[-6:] == ["by tag:", "  tag    passed  rate", "  all    6/12    50.0%", "  right  6/6     100.0%",
                                     f"  short  {short_passed}/{len(short)}     {short_passed / len(short):.1%}",
                                     "  wrong  0/6     0.0%"]


def test_a_bad_against_program_is_named_before_anything_runs(tiny_program, tiny_gguf, tmp_path, capsys, monkeypatch):
    import paw_lite.cli.test as test_cli

    ran = []
    monkeypatch.setattr(test_cli, "evaluate", lambda *a, **k: ran.append(a))
    path = write_cases(tmp_path / "cases.jsonl", [{"input": "a", "expected": "b"}])
    rc = main(["test", str(tiny_program), str(path), "--against", str(tmp_path / "old.paw"), "--base-model", str(tiny_gguf),
               "--json"])
    error = json.loads(capsys.readouterr().out)
    assert rc == 2 and str(tmp_path / "old.paw") in error["error"] and ran == []
