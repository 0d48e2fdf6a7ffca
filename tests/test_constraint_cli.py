"""Constrained outputs on the command line: `paw-lite run` (one TEXT and --input-file batch runs)
and `paw-lite test` with --choice / --regex / --json-schema give the Python API's outputs; a cut
input is its own error record (or error case); the batch fingerprint holds the constraint but is
unchanged without one; a bad constraint exits 2 naming its flag before anything is evaluated."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import paw_lite
from paw_lite.batch_files import BatchItem, run_batch, run_id
from paw_lite.cli import main
from paw_lite.constraints import IncompleteOutputError, OutputConstraint
from paw_lite.errors import PawError

CHOICES = ["ALERT", "QUIET"]
REGEX = r"[0-9]{1,3}"
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["ALERT", "QUIET", "INFO", "WARN"]},
                                           "severity": {"enum": ["low", "mid", "high"]}},
          "required": ["label", "severity"], "additionalProperties": False}
LINES = ["ok", "disk usage at 99% on /var and climbing fast", "ünïcödé ✓", "a <|endoftext|> b", "user logged in",
         "kernel panic - not syncing", "", "login failed for root"]


@pytest.fixture(scope="module")
def fn(tiny_program, tiny_gguf, tmp_path_factory):
    with paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path_factory.mktemp("c")) as f:
        yield f


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def schema_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("schema") / "label.json"
    path.write_text(json.dumps(SCHEMA, indent=2), encoding="utf-8")
    return path


def constraint(kind: str, schema_file: Path) -> tuple[list[str], dict]:
    """(the flags, the Python keywords) of one constraint."""
    if kind == "choices":
        return ["--choice", CHOICES[0], "--choice", CHOICES[1]], {"choices": CHOICES}
    if kind == "regex":
        return ["--regex", REGEX], {"regex": REGEX}
    return ["--json-schema", str(schema_file)], {"json_schema": SCHEMA}


def run(tiny_program, tiny_gguf, *args) -> int:
    return main(["run", str(tiny_program), "--base-model", str(tiny_gguf), *map(str, args)])


def cutting_max_tokens(fn, **kwargs) -> int:
    """A max_tokens that cuts some LINES' constrained outputs and not others: the shortest length."""
    lengths = [len(ids) for ids in fn.map_ids(LINES, max_tokens=40, **kwargs)]
    assert min(lengths) < max(lengths), lengths
    return min(lengths)


@pytest.mark.parametrize("kind", ["choices", "regex", "json_schema"])
def test_one_text_equals_the_python_api(fn, tiny_program, tiny_gguf, schema_file, capsys, kind):
    flags, kwargs = constraint(kind, schema_file)
    outs = fn.map(LINES, max_tokens=40, errors="return", **kwargs)
    text, want = next((t, o) for t, o in zip(LINES, outs) if t and isinstance(o, str))
    assert run(tiny_program, tiny_gguf, text, "--max-tokens", "40", *flags, "--json") == 0
    assert json.loads(capsys.readouterr().out)["output"] == want
    assert run(tiny_program, tiny_gguf, text, "--max-tokens", "40", *flags) == 0
    assert capsys.readouterr().out == want + "\n"
    if kind == "json_schema":
        assert set(json.loads(want)) == {"label", "severity"}


def test_one_text_cut_short_is_an_error(tiny_program, tiny_gguf, schema_file, capsys):
    assert run(tiny_program, tiny_gguf, "user logged in", "--max-tokens", "2", "--json-schema", schema_file, "--json") == 2
    out = json.loads(capsys.readouterr().out)
    assert out["type"] == "IncompleteOutputError" and "cut after 2 tokens" in out["error"]


@pytest.mark.parametrize("kind", ["choices", "json_schema"])
def test_batch_records_equal_the_python_api_and_a_cut_input_is_its_error_record(fn, tiny_program, tiny_gguf, schema_file,
                                                                                tmp_path, capsys, kind):
    flags, kwargs = constraint(kind, schema_file)
    limit = cutting_max_tokens(fn, **kwargs)
    want = fn.map(LINES, max_tokens=limit, errors="return", **kwargs)
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inp.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    assert run(tiny_program, tiny_gguf, "--input-file", inp, "--output", out, "--max-tokens", limit, "--batch-size", 3,
               *flags, "--json") == 1  # 1: the cut inputs failed
    cut = sum(isinstance(w, IncompleteOutputError) for w in want)
    assert json.loads(capsys.readouterr().out) | {"output": None} == {
        "inputs": len(LINES), "already_done": 0, "failed_before": 0, "retried": 0, "ok": len(LINES) - cut,
        "failed": cut, "output": None}
    recs = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["index"] for r in recs] == list(range(len(LINES)))
    assert len({r["run"] for r in recs}) == 1
    for r, w in zip(recs, want):
        if isinstance(w, IncompleteOutputError):
            assert "output" not in r and f"cut after {len(w.ids)} tokens" in r["error"], r
            assert repr(w.partial) in r["error"] and "of the map" not in r["error"]
        else:
            assert r["output"] == w and "error" not in r


def test_a_returned_error_is_its_inputs_record_and_the_chunk_is_not_run_again():
    """fn.map(errors="return") hands a cut input's IncompleteOutputError back in its place (and to
    on_result): that input's error record; the chunk's other outputs stand, with no rerun one by one."""
    calls, recs = [], []

    def call(texts, on_output):
        calls.append(texts)
        outs = [IncompleteOutputError("input 1 of the map was cut", "AL", [1, 2]) if t == "b" else t.upper()
                for t in texts]
        if on_output:
            on_output(1, outs[1])
            on_output(0, outs[0])
        return outs

    items = [BatchItem(i, t) for i, t in enumerate("abcd")]
    assert run_batch(items, call, recs.append, chunk=4) == (3, 1)
    assert calls == [["a", "b", "c", "d"]]
    assert [r.get("output") for r in recs] == ["A", None, "C", "D"]
    assert recs[1]["error"].startswith("the output was cut after 2 tokens") and "'AL'" in recs[1]["error"]


def test_the_fingerprint_holds_the_constraint_and_is_unchanged_without_one():
    fp = "ab" * 32
    assert run_id(fp, 4) == hashlib.sha256(f"{fp}\0{4}".encode()).hexdigest()[:16]  # what paw-lite wrote before constraints
    assert run_id(fp, None) == run_id(fp, None, None) == hashlib.sha256(f"{fp}\0None".encode()).hexdigest()[:16]
    ids = {run_id(fp, 4, OutputConstraint.of(**kw)) for kw in
           ({"choices": ["A", "B"]}, {"choices": ["A", "C"]}, {"regex": "A|B"}, {"json_schema": SCHEMA},
            {"json_schema": {"type": "integer"}})}
    assert len(ids) == 5 and run_id(fp, 4) not in ids
    assert run_id(fp, 4, OutputConstraint.of(json_schema=SCHEMA)) == \
        run_id(fp, 4, OutputConstraint.of(json_schema=json.dumps(SCHEMA, indent=1)))  # the schema, not its spelling


def test_resuming_with_another_constraint_is_refused(fn, tiny_program, tiny_gguf, schema_file, tmp_path, capsys):
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inp.write_text("ok\nuser logged in\n", encoding="utf-8")
    assert run(tiny_program, tiny_gguf, "--input-file", inp, "--output", out, "--max-tokens", 4) == 0
    # A file from before constraints existed (records' run = sha256(fingerprint \0 max_tokens)) resumes.
    assert {json.loads(line)["run"] for line in out.read_bytes().splitlines()} == \
        {hashlib.sha256(f"{fn.fingerprint}\0{4}".encode()).hexdigest()[:16]}
    first_line = out.read_bytes().split(b"\n", 1)[0] + b"\n"
    runs = [[], ["--choice", "ALERT", "--choice", "QUIET"], ["--choice", "ALERT", "--choice", "INFO"], ["--regex", "ALERT|QUIET"]]
    for made_by in runs:
        for other in runs:
            out.write_bytes(first_line)
            if made_by:  # the first record as the constrained run makes it
                out.unlink()
                run(tiny_program, tiny_gguf, "--input-file", inp, "--output", out, "--max-tokens", 40, *made_by)
                out.write_bytes(out.read_bytes().split(b"\n", 1)[0] + b"\n")
            capsys.readouterr()
            before = out.read_bytes()
            code = run(tiny_program, tiny_gguf, "--input-file", inp, "--output", out,
                       "--max-tokens", 40 if made_by else 4, *other, "--json")
            captured = capsys.readouterr()
            if other == made_by:
                assert code == 0 and json.loads(captured.out)["already_done"] == 1, captured.err
            else:
                assert code == 2 and "--max-tokens or constraint" in captured.err, (made_by, other)
                assert out.read_bytes() == before


def _no_evaluation(monkeypatch):
    from paw_lite.gpt2_packed import GPT2Packed

    monkeypatch.setattr(GPT2Packed, "forward", lambda *a, **k: pytest.fail("evaluated"))


def _bad_constraints(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "list.json").write_text("[1]", encoding="utf-8")
    (tmp_path / "refused.json").write_text('{"type": "integer", "minimum": "x"}', encoding="utf-8")
    return [
        (["--choice", "ALERT", "--choice", ""], "--choice: choices holds an empty choice"),
        (["--choice", " a"], "--choice: choice ' a' starts with whitespace"),
        (["--regex", "(unclosed"], "--regex: regex '(unclosed' cannot be compiled"),
        (["--json-schema", str(tmp_path / "missing.json")], f"--json-schema {tmp_path / 'missing.json'}: cannot read"),
        (["--json-schema", str(tmp_path)], f"--json-schema {tmp_path}: not a regular file"),
        (["--json-schema", str(tmp_path / "bad.json")], f"--json-schema {tmp_path / 'bad.json'}: not valid JSON"),
        (["--json-schema", str(tmp_path / "list.json")], f"--json-schema {tmp_path / 'list.json'}: json_schema must be a JSON object"),
        (["--json-schema", str(tmp_path / "refused.json")], f"--json-schema {tmp_path / 'refused.json'}: json_schema cannot be compiled"),
        (["--choice", "A", "--regex", "A"], "argument --regex: not allowed with argument --choice"),
    ]


def test_bad_constraints_exit_2_naming_the_flag_before_any_evaluation(tiny_program, tiny_gguf, tmp_path, capsys,
                                                                      monkeypatch):
    paw_lite.function(tiny_program, base_model=tiny_gguf).close()  # the prefix cached: loading evaluates nothing
    _no_evaluation(monkeypatch)
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inp.write_text("ok\n", encoding="utf-8")
    cases = tmp_path / "cases.jsonl"
    cases.write_text('{"input": "ok", "expected": "ALERT"}\n', encoding="utf-8")
    for flags, message in _bad_constraints(tmp_path):
        for argv in (["run", str(tiny_program), "ok"], ["run", str(tiny_program), "--input-file", str(inp), "--output", str(out)],
                     ["test", str(tiny_program), str(cases)]):
            assert main([*argv, "--base-model", str(tiny_gguf), *flags, "--json"]) == 2, (argv, flags)
            stdout, err = capsys.readouterr()
            assert message in json.loads(stdout)["error"] and message in err, (argv, flags, err)
            assert not out.exists()  # refused before the output file was opened


def test_paw_lite_test_records_the_constraint_and_a_cut_case_is_an_error(fn, tiny_program, tiny_gguf, schema_file,
                                                                         tmp_path, capsys):
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"input": t, "expected": "ALERT"}) + "\n" for t in LINES), encoding="utf-8")
    for kind in ("choices", "json_schema"):
        flags, kwargs = constraint(kind, schema_file)
        limit = cutting_max_tokens(fn, **kwargs)
        want = fn.map(LINES, max_tokens=limit, errors="return", **kwargs)
        assert main(["test", str(tiny_program), str(cases), "--base-model", str(tiny_gguf), "--max-tokens", str(limit),
                     "--batch-size", "3", *flags, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["options"] == {"match": "exact", "max_tokens": limit, **kwargs}
        for case, w in zip(report["cases"], want, strict=True):
            if isinstance(w, IncompleteOutputError):
                assert case["verdict"] == "error" and case["output"] is None
                assert f"cut after {len(w.ids)} tokens" in case["reason"] and repr(w.partial) in case["reason"]
            else:
                assert case["output"] == w and case["verdict"] == ("pass" if w == "ALERT" else "fail")
        assert report["summary"]["errors"] == sum(isinstance(w, PawError) for w in want) > 0


def test_evaluate_takes_a_constraint_through_call_options(fn):
    limit = cutting_max_tokens(fn, choices=CHOICES)
    want = fn.map(LINES, max_tokens=limit, errors="return", choices=CHOICES)
    report = paw_lite.evaluate(fn, [{"input": t, "expected": "QUIET"} for t in LINES], max_tokens=limit,
                               call_options={"choices": CHOICES})
    assert [r.output if r.verdict != "error" else "error" for r in report.results] == \
        [w if isinstance(w, str) else "error" for w in want]
    with pytest.raises(paw_lite.PawError, match="cannot be compiled"):
        paw_lite.evaluate(fn, [{"input": "ok", "expected": "1"}], call_options={"regex": "(unclosed"})
