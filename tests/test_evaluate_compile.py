"""`paw-lite compile SPEC -o OUT.paw --test CASES`: the new program's pass rate right after the
compile, on the tiny compiler models of the compiler tests."""

from __future__ import annotations

import json

import pytest

import paw_lite
from compiler_fixtures import TINY_BASES, TINY_RANK, random_mapper_state, save_mapper, tiny_qwen, write_compiler_meta
from paw_lite.cli import main
from oracles import oracle
from paw_lite.compiler import compile

oracle("llama_cpp")
pytestmark = pytest.mark.llama

SPEC = "Classify a log line as ALERT when it reports a failure, else QUIET."
PSEUDO = ("[PSEUDO_PROGRAM]\nTask: Answer ALERT for failures, QUIET otherwise.\n\nExamples:\n"
          "Input: disk full on /var\nOutput: ALERT\n\nInput: user logged in\nOutput: QUIET\n[END_PSEUDO_PROGRAM]")
INPUTS = ["disk usage at 99% on /var", "user alice logged in", "kernel panic", "backup finished"]
MAX_TOKENS = 6


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, vocab_dir, hf_tokenizer_dir):
    """A models directory as `paw-lite models pull` leaves it, with the tiny compiler models."""
    from conftest import make_hf_gpt2
    from paw_lite.base_model import read_header
    from paw_lite.compiler.config import DEFAULT_FILES
    from paw_lite.convert.gpt2 import convert_hf_gpt2

    _, qwen_gguf = tiny_qwen(tmp_path_factory, vocab_dir)
    root = tmp_path_factory.mktemp("interp")
    interp = convert_hf_gpt2(make_hf_gpt2(root / "hf", hf_tokenizer_dir, n_ctx=512), root / "tiny-gpt2-f32.gguf", "f32")
    d = tmp_path_factory.mktemp("models")
    config, _ = read_header(interp)
    save_mapper(d / DEFAULT_FILES["mapper"], random_mapper_state(256, config, TINY_RANK, TINY_BASES, seed=3))
    write_compiler_meta(d / DEFAULT_FILES["compiler_meta"])
    for key, src in (("compiler", qwen_gguf), ("pseudo_compiler", qwen_gguf), ("interpreter", interp)):
        (d / DEFAULT_FILES[key]).symlink_to(src)
    return d, interp


def test_compile_test_prints_the_pass_rate_of_the_new_program(models, tmp_path, capsys):
    d, interp = models
    # The program this spec and pseudo-program compile to (compiling is deterministic: the compiler
    # tests check the same bytes come out twice), and its outputs one input at a time.
    first = compile(SPEC, tmp_path / "first.paw", pseudo_program=PSEUDO, models=d)
    with paw_lite.function(first, base_model=interp) as fn:
        outputs = [fn(t) for t in INPUTS]
    expected = [outputs[0], "not it", outputs[2], "not it either"]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"input": t, "expected": e}) + "\n" for t, e in zip(INPUTS, expected)))
    pseudo = tmp_path / "pseudo.txt"
    pseudo.write_text(PSEUDO, encoding="utf-8")
    out = tmp_path / "prog.paw"

    rc = main(["compile", SPEC, "-o", str(out), "--models", str(d), "--pseudo-program", str(pseudo), "--test", str(cases)])
    text = capsys.readouterr().out
    assert rc == 0 and f"test:   {out}: 2/4 passed (50.0%) on {cases}" in text.splitlines()

    rc = main(["compile", SPEC, "-o", str(tmp_path / "again.paw"), "--models", str(d), "--pseudo-program", str(pseudo),
               "--test", str(cases), "--json"])
    summary = json.loads(capsys.readouterr().out)
    report = summary["test"]
    assert rc == 0 and report["schema"] == 1 and report["summary"]["pass_rate"] == 0.5
    assert [c["output"] for c in report["cases"]] == outputs
    assert report["program"]["source"] == str(tmp_path / "again.paw") and report["cases_file"] == str(cases)
    assert report["interpreter"]["path"] == str(d / "gpt2-q8_0.gguf")


def test_a_missing_cases_file_is_refused_before_the_compile(models, tmp_path, capsys):
    d, _ = models
    out = tmp_path / "prog.paw"
    rc = main(["compile", SPEC, "-o", str(out), "--models", str(d), "--test", str(tmp_path / "no-such.jsonl"), "--json"])
    error = json.loads(capsys.readouterr().out)
    assert rc == 2 and "cannot read the cases file" in error["error"] and not out.exists()
