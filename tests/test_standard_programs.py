"""Standard programs (Qwen3 interpreter) through the whole API, on a tiny random Qwen3 with the real
Qwen vocabulary (4 layers, width 256, grouped-query attention) and a random rank-32 LoRA on all 7
modules of every layer, written as a Q4_0 adapter.gguf (general.architecture qwen3), with the
Standard template (the Qwen chat wrapping, thinking off).

Oracles: transformers + PEFT (fp32) decoding the same prompt ids greedily; llama.cpp on the same
GGUF + adapter.gguf, driven the way the official runtime drives it (programasweights 0.4.14,
runtime_llamacpp.py: eval the prefix, eval input + suffix, `sample(temp=0)` / `eval([token])`).
llama.cpp keeps its KV cache in float16 and rounds activations for the Q4_0 adapter, so where its
greedy tokens part from ours the step must be a near-tie in the fp32 oracle (`assert_same_or_near_tie`)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import paw_lite
from paw_lite import prefix_cache
from paw_lite.base_model import BaseModel, read_header
from paw_lite.constraints import ChoiceMatcher, TokenTable
from paw_lite.errors import IncompatibleModelError
from paw_lite.families import COMPACT, STANDARD
from paw_lite.lora import LoraAdapter, write_peft_dir
from paw_lite.program import Program
from paw_lite.testing.qwen3 import ENDOFTEXT_ID, IM_END_ID, random_qwen3_lora

from compiler_fixtures import tiny_qwen
from standard_fixtures import make_standard_program
from llama_oracle import assert_same_or_near_tie
from oracles import oracle

torch = oracle("torch")
oracle("transformers", "peft")
llama_cpp = oracle("llama_cpp")

RANK = 32
MAX_TOKENS = 12
EOS = [IM_END_ID, ENDOFTEXT_ID]
INPUTS = ["works great, five stars", "broke after a day", "\nleading newline", "  two spaces", "naïve café — 東京 🤖",
          "12345 67.89", "<think>typed</think>", "a much longer review: the battery lasts two days, the screen is sharp, "
          "but the speaker crackles at high volume and the case scratches easily"]
# The near-tie tolerance on fp32 logits where llama.cpp (f16 KV cache, Q8_0 activations for the Q4_0
# adapter) parts from the fp32 oracles; measured differences in this fixture stay below 0.05.
NEAR_TIE = 0.1


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, vocab_dir) -> tuple[Path, Path]:
    """(HF folder, F32 GGUF) of the tiny Qwen3."""
    return tiny_qwen(tmp_path_factory, vocab_dir)


@pytest.fixture(scope="module")
def program(tmp_path_factory, qwen) -> Path:
    config, _ = read_header(qwen[1])
    return make_standard_program(tmp_path_factory.mktemp("std") / "review.paw", random_qwen3_lora(config, RANK, std=0.08))


@pytest.fixture(scope="module")
def fn(program, qwen, tmp_path_factory):
    f = paw_lite.function(program, base_model=qwen[1], cache_dir=tmp_path_factory.mktemp("cache"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def peft_model(fn, program, qwen, tmp_path_factory):
    """transformers' Qwen3 (fp32) with the program's adapter as a PEFT LoRA (the dequantized Q4_0 values)."""
    PeftModel, AutoModelForCausalLM = oracle("peft").PeftModel, oracle("transformers").AutoModelForCausalLM
    adapter = LoraAdapter.from_program(Program.load(program), fn.config)
    peft_dir = write_peft_dir(tmp_path_factory.mktemp("peft") / "adapter", adapter)
    base = AutoModelForCausalLM.from_pretrained(qwen[0], dtype=torch.float32)
    return PeftModel.from_pretrained(base, peft_dir).eval()


def hf_greedy(model, prompt_ids: list[int], max_new: int) -> list[int]:
    """transformers' greedy generate, without the prompt and the EOS (either of the two ends it)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=EOS, pad_token_id=ENDOFTEXT_ID)
    ids = out[0, len(prompt_ids):].tolist()
    ends = [i for i, t in enumerate(ids) if t in EOS]
    return ids[:ends[0]] if ends else ids


class OfficialRuntime:
    """llama.cpp driven the official runtime's way: the prefix evaluated once, then per call the
    input + suffix evaluated after it and tokens sampled at temperature 0 until EOS."""

    def __init__(self, gguf: Path, adapter: Path, prefix: str, suffix: str, n_ctx: int = 512):
        self.llm = llama_cpp.Llama(model_path=str(gguf), lora_path=str(adapter), n_ctx=n_ctx, n_threads=2,
                                   verbose=False, seed=0)
        self.prefix_ids = self.llm.tokenize(prefix.encode(), add_bos=False, special=True)
        self.suffix = suffix
        self.llm.eval(self.prefix_ids)

    def __call__(self, text: str, max_tokens: int) -> tuple[list[int], list[int]]:
        """(prompt ids, output ids)."""
        self.llm.n_tokens = len(self.prefix_ids)
        ids = self.llm.tokenize((text + self.suffix).encode(), add_bos=False, special=True)
        self.llm.eval(ids)
        out: list[int] = []
        while len(out) < max_tokens:
            token = self.llm.sample(temp=0)
            # The official loop stops at the file's EOS only (<|im_end|> here); paw_lite's Standard
            # family also ends on <|endoftext|> (families.STANDARD), and so does this oracle.
            if token in EOS:
                break
            out.append(token)
            self.llm.eval([token])
        return self.prefix_ids + ids, out

    def close(self) -> None:
        self.llm.close()


def test_the_program_is_standard_and_runs_on_qwen3(fn, program):
    prog = Program.load(program)
    assert prog.family == STANDARD and prog.runtime_id == "qwen3-0.6b-q6_k" and prog.meta["prefix_steps"] is None
    assert fn.family == STANDARD and "4-layer Qwen3" in repr(fn)
    assert fn.tokenizer.eos_ids == (IM_END_ID, ENDOFTEXT_ID)
    ids = fn.prompt_ids("hello")
    assert ids[:len(fn._prefix_ids)] == fn._prefix_ids and fn.tokenizer.special["</think>"] in ids


def test_greedy_output_equals_transformers_peft(fn, peft_model):
    distinct = set()
    for text in INPUTS:
        ours = fn.generate_ids(text, max_tokens=MAX_TOKENS)
        assert ours == hf_greedy(peft_model, fn.prompt_ids(text), MAX_TOKENS), text
        assert fn(text, max_tokens=MAX_TOKENS) == fn.tokenizer.decode(ours).strip()
        distinct.add(tuple(ours))
    assert len(distinct) > 1, "outputs should depend on the input"


def test_greedy_output_equals_the_official_runtimes_llama_cpp(fn, program, qwen, peft_model, tmp_path):
    prog = Program.load(program)
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(prog.adapter_gguf)
    official = OfficialRuntime(qwen[1], adapter, prog.prefix, prog.suffix)
    try:
        for text in INPUTS:
            if "<think>" in text:  # typed text that looks like a template token stays text in paw_lite, on purpose
                continue
            prompt, theirs = official(text, MAX_TOKENS)
            assert prompt == fn.prompt_ids(text), text  # the same prompt ids, split the same way
            ours = fn.generate_ids(text, max_tokens=MAX_TOKENS)
            assert_same_or_near_tie(ours, theirs, prompt, peft_model, NEAR_TIE, eos=IM_END_ID)
    finally:
        official.close()


def test_map_equals_one_by_one_with_ragged_batches_and_workers(fn):
    texts = INPUTS * 2 + ["x", "a medium length input about nothing in particular"]
    one_by_one = [fn(t, max_tokens=MAX_TOKENS) for t in texts]
    assert fn.map(texts, max_tokens=MAX_TOKENS, batch_size=3, workers=2) == one_by_one
    assert fn.map(texts, max_tokens=MAX_TOKENS, batch_size=64, workers=1) == one_by_one
    # different lengths per input: each stops at its own limit
    assert fn.map_ids(texts[:3], max_tokens=5) == [fn.generate_ids(t, max_tokens=5) for t in texts[:3]]


def test_choices_pick_the_best_allowed_token_of_the_fp32_oracle(fn, peft_model):
    choices = ["POSITIVE", "NEGATIVE", "MIXED review"]
    table = TokenTable.of(fn.tokenizer)
    assert set(table.eos_ids) == set(EOS)
    for text in INPUTS[:4]:
        out = fn(text, choices=choices)
        assert out in choices
        ids = fn.generate_ids(text, choices=choices)
        state = ChoiceMatcher(tuple(choices), table).start()
        prompt = fn.prompt_ids(text)
        for i, token in enumerate(ids):
            allowed = state.allowed()
            if len(allowed) > 1:  # a real choice: ours is the oracle's best allowed token, or a near-tie
                with torch.no_grad():
                    logits = peft_model(torch.tensor([prompt + ids[:i]])).logits[0, -1].numpy()
                best = allowed[np.argmax(logits[allowed])]
                assert token == best or abs(logits[token] - logits[best]) < 1e-4, (text, i)
            state.advance(token)
        assert state.complete


def test_regex_and_json_schema(fn):
    """A random model may write whitespace (allowed before any output) until max_tokens: that input's
    result is then an IncompleteOutputError holding the partial output. Every complete result
    matches; the regex run completes some (this tiny model writes whitespace before JSON until any
    limit, so for the schema only the partial outputs' validity is checked)."""
    import re

    oracle("llguidance")
    jsonschema = oracle("jsonschema")
    pattern = r"[A-Z]{3,8}( [0-9]{1,2})?"
    schema = {"type": "object", "properties": {"label": {"enum": ["POSITIVE", "NEGATIVE"]}, "score": {"type": "integer"}},
              "required": ["label", "score"], "additionalProperties": False}
    matched = fn.map(INPUTS, regex=pattern, max_tokens=24, errors="return")
    assert any(isinstance(r, str) for r in matched)
    for text, r in zip(INPUTS, matched):
        if isinstance(r, str):
            assert re.fullmatch(pattern, r) and fn(text, regex=pattern, max_tokens=24) == r
        else:
            assert isinstance(r, paw_lite.IncompleteOutputError) and not r.partial.strip()
    docs = fn.map(INPUTS[:4], json_schema=schema, max_tokens=16, errors="return")
    for r in docs:
        if isinstance(r, str):
            jsonschema.validate(json.loads(r), schema)
        else:
            assert isinstance(r, paw_lite.IncompleteOutputError)
            assert not r.partial.strip() or r.partial.lstrip().startswith("{"), r.partial
            assert all(t not in fn.tokenizer.eos_ids for t in r.ids)


def test_the_prefix_cache_is_reused_across_loads_and_keyed_by_family(program, qwen, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="paw_lite"):
        a = paw_lite.function(program, base_model=qwen[1], cache_dir=tmp_path)
        first = a("works great", max_tokens=MAX_TOKENS)
        a.close()
        assert "tokens evaluated" in caplog.text and "read from" not in caplog.text
        caplog.clear()
        b = paw_lite.function(program, base_model=qwen[1], cache_dir=tmp_path)
        assert "keys and values read from" in caplog.text and "tokens evaluated" not in caplog.text
        assert b("works great", max_tokens=MAX_TOKENS) == first
        b.close()
    # the same interpreter, adapter and prefix ids under another family is another key
    assert prefix_cache.cache_key(STANDARD.name, "f", "a", [1, 2]) != prefix_cache.cache_key(COMPACT.name, "f", "a", [1, 2])
    assert len(list((tmp_path / "prefix").glob("*.kv"))) == 1


def test_the_interpreter_is_picked_from_the_runtime_id(program, qwen, fn, tmp_path, monkeypatch):
    (tmp_path / "qwen3-0.6b-q6_k.gguf").symlink_to(qwen[1])
    monkeypatch.setenv("PAW_LITE_MODELS", str(tmp_path))
    with paw_lite.function(program, cache_dir=tmp_path / "cache") as picked:
        assert picked("broke after a day", max_tokens=MAX_TOKENS) == fn("broke after a day", max_tokens=MAX_TOKENS)
    monkeypatch.setenv("PAW_LITE_MODELS", str(tmp_path / "empty"))
    with pytest.raises(paw_lite.PawError, match="interpreter qwen3-0.6b-q6_k.gguf is not in the models directory"):
        paw_lite.function(program, cache_dir=tmp_path / "cache")


def test_an_hf_qwen3_folder_is_the_same_interpreter(program, qwen, fn, tmp_path):
    with paw_lite.function(program, base_model=qwen[0], cache_dir=tmp_path) as hf:
        assert hf.family == STANDARD
        for text in INPUTS[:3]:
            assert hf.generate_ids(text, max_tokens=MAX_TOKENS) == fn.generate_ids(text, max_tokens=MAX_TOKENS)


def test_a_shared_base_serves_two_programs(program, qwen, fn, tmp_path):
    base = BaseModel.load(qwen[1])
    assert base.family == STANDARD
    config, _ = read_header(qwen[1])
    other = make_standard_program(tmp_path / "other.paw", random_qwen3_lora(config, 8, seed=5, std=0.08), tensor_type="f32")
    with paw_lite.function(program, base_model=base, cache_dir=tmp_path) as a, \
            paw_lite.function(other, base_model=base, cache_dir=tmp_path) as b:
        assert a("works great", max_tokens=MAX_TOKENS) == fn("works great", max_tokens=MAX_TOKENS)
        assert b.generate_ids("works great", max_tokens=MAX_TOKENS) != a.generate_ids("works great", max_tokens=MAX_TOKENS)


def test_a_program_on_the_other_familys_interpreter_is_refused(program, qwen, tiny_gguf, tiny_program, tmp_path):
    with pytest.raises(IncompatibleModelError, match=r"review\.paw is a Standard program \(interpreter Qwen/Qwen3-0\.6B, "
                       r"qwen3-0\.6b-q6_k\.gguf\), but the interpreter .*tiny-f32\.gguf is a GPT-2 model, which runs "
                       r"Compact programs; pass base_model= / --base-model qwen3-0\.6b-q6_k\.gguf"):
        paw_lite.function(program, base_model=tiny_gguf, cache_dir=tmp_path)
    with pytest.raises(IncompatibleModelError, match=r"tiny\.paw is a Compact program \(interpreter gpt2, gpt2-q8_0\.gguf\), "
                       r"but the interpreter .*\.gguf is a Qwen3 model, which runs Standard programs"):
        paw_lite.function(tiny_program, base_model=qwen[1], cache_dir=tmp_path)


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paw_lite", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_run_inspect_and_test_commands(program, qwen, fn, tmp_path):
    env = {"PAW_LITE_CACHE": str(tmp_path / "cache")}
    info = json.loads(_cli("inspect", program, "--json").stdout)
    assert (info["family"], info["interpreter"], info["runtime_id"]) == ("standard", "Qwen/Qwen3-0.6B", "qwen3-0.6b-q6_k")
    assert info["adapter"]["architecture"] == "qwen3" and info["adapter"]["rank"] == RANK
    one = _cli("run", program, INPUTS[0], "--base-model", qwen[1], "--max-tokens", MAX_TOKENS, "--json", env=env)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["output"] == fn(INPUTS[0], max_tokens=MAX_TOKENS)
    # a batch file (JSONL: inputs may hold newlines), with a constraint, then `paw-lite test` on
    # cases made from its outputs. An output the random model leaves as whitespace until
    # --max-tokens is that line's error record.
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in INPUTS[:5]), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    choice = ["--choice", "POSITIVE", "--choice", "NEGATIVE"]
    batch = _cli("run", program, "--input-file", inputs, "--output", out, "--base-model", qwen[1], "--max-tokens", 24,
                 *choice, "--json", env=env)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    local = fn.map(INPUTS[:5], max_tokens=24, choices=["POSITIVE", "NEGATIVE"], errors="return")
    assert [r.get("output") for r in records] == [x if isinstance(x, str) else None for x in local]
    assert any("output" in r for r in records)
    assert [("error" in r) for r in records] == [isinstance(x, paw_lite.IncompleteOutputError) for x in local]
    assert batch.returncode == (1 if any("error" in r for r in records) else 0), batch.stderr
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"input": t, "expected": r["output"]}) + "\n"
                             for t, r in zip(INPUTS[:5], records) if "output" in r), encoding="utf-8")
    report = _cli("test", program, cases, "--base-model", qwen[1], "--max-tokens", 24, *choice, "--json", env=env)
    assert report.returncode == 0, report.stderr
    assert '"pass_rate": 1.0' in report.stdout


def test_dask_map_equals_local_map(program, qwen, fn, tmp_path):
    oracle("distributed")
    from distributed import Client, LocalCluster

    import dask.bag as db
    import paw_lite.dask

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "qwen3-0.6b-q6_k.gguf").symlink_to(qwen[1])
    env = {"PAW_LITE_MODELS": str(tmp_path / "models"), "PAW_LITE_CACHE": str(tmp_path / "cache")}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", env=env) as cluster, \
            Client(cluster):
        bag = db.from_sequence(INPUTS, npartitions=3)
        assert paw_lite.dask.map(program, bag, max_tokens=MAX_TOKENS).compute() == fn.map(INPUTS, max_tokens=MAX_TOKENS)
