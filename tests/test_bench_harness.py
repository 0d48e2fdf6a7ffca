"""The benchmark harness (benchmarks/interpreter_bench.py, `paw-lite bench`), without running it:
its workload has the token counts it claims, and its report computes ratios and targets right.
The measurement itself is never a timed test; see benchmarks/README.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from paw_lite.cli import main
from paw_lite.cli.bench import bench_module
from paw_lite.tokenizer import GPT2Tokenizer


@pytest.fixture(scope="module")
def bench():
    return bench_module()


@pytest.fixture(scope="module")
def tok(gpt2_vocab):
    tokens, merges, special, eos = gpt2_vocab
    return GPT2Tokenizer(tokens, merges, special, eos, "vocab")


def test_workload_has_the_stated_token_counts(bench, tok):
    template, prefix_ids = bench._template(tok)
    prefix, suffix = template.split("{INPUT_PLACEHOLDER}")
    assert len(prefix_ids) == bench.PREFIX_TOKENS == 250
    rng = np.random.default_rng(0)
    n_suffix = len(tok.encode_prompt(prefix, "", suffix)) - len(prefix_ids)
    for n in (bench.INPUT_TOKENS, bench.PREFILL_TOKENS):
        call = bench._prompt(tok, prefix, suffix, prefix_ids, bench._sentence(tok, rng, n))
        assert call["ids"][:250] == prefix_ids
        assert len(call["ids"]) == 250 + n + n_suffix


def _row(key, p, l, lower=True):
    return {"key": key, "label": key, "unit": "s" if lower else "calls/s", "lower_is_better": lower,
            "paw_lite": p, "llama_cpp": l, "ratio": None if p is None or l is None else p / l, "samples": {}}


def test_report_shows_ratios_and_targets(bench):
    result = {
        "rows": [_row("cold_start_s", 1.2, 0.6), _row("prefix_eval_s", 0.2, 0.4), _row("one_call_s", 0.15, 0.2),
                 _row("decode_tok_s", 50.0, 80.0, False), _row("prefill_tok_s", 900.0, 600.0, False),
                 _row("throughput_calls_s", 30.0, 5.0, False), _row("peak_rss_one_program_mb", 700.0, 300.0),
                 _row("peak_rss_run_mb", 900.0, 310.0), _row("cold_start_cached_prefix_s", 0.9, None),
                 _row("one_call_floor_s", 0.1, 0.2), _row("decode_floor_tok_s", 60.0, 80.0, False)],
        "agreement": {"inputs": 20, "tokens_each": 16, "identical_sequences": 15, "matching_tokens": 300,
                      "total_tokens": 320, "mean_tokens_before_first_difference": 13.5},
        "map_equals_one_by_one": "32/32",
        "conditions": {"repeats": 3, "inner": 7, "calls": 256, "batch_size": 64, "llama_n_threads": 2, "cpus": 2,
                       "loadavg_before": (0.1, 0, 0), "loadavg_after": (0.2, 0, 0), "numpy": "2", "llama_cpp_python": "0.3.36"},
    }
    text = bench.format_table(result)
    assert "| one_call_s | 150 ms | 200 ms | 0.75x |" in text
    assert "| throughput_calls_s | 30.0 calls/s | 5.0 calls/s | 6.00x |" in text
    assert "| cold_start_cached_prefix_s | 900 ms | n/a |  |" in text
    assert "target one_call_s: ratio <= 1: met (0.75)" in text
    assert "target cold_start_s: ratio <= 3: met (2.00)" in text
    assert "target throughput_calls_s: ratio >= 5: met (6.00)" in text
    assert "target peak_rss_one_program_mb: paw_lite <= 763 MiB: met (700.00)" in text
    assert "15/20 identical sequences" in text
    assert "| one_call_floor_s | 100 ms | 200 ms | 0.50x |" in text
    result["rows"][2] = _row("one_call_s", 0.25, 0.2)
    assert "target one_call_s: ratio <= 1: NOT met (1.25); paw_lite's float32 products alone: 0.50" in bench.format_table(result)
    agree = bench._agreement([[1, 2, 3], [1, 2, 3]], [[1, 2, 3], [1, 5, 3]])
    assert agree["identical_sequences"] == 1 and agree["matching_tokens"] == 5
    assert agree["mean_tokens_before_first_difference"] == 2.0


def test_bench_command_checks_its_options(capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_bench_output_paths_are_checked_before_it_runs(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(["bench", "--cache", str(tmp_path / "cache"), "--output", str(folder), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"] == f"--output {folder} is a folder; give the path of a file to write"
    assert not (tmp_path / "cache").exists()  # nothing generated


def _bench_without_vocab(tmp_path, **env_vars) -> subprocess.CompletedProcess:
    """`paw-lite bench --quick --json` on a fresh test cache, where pip cannot reach any package: it
    stops at fetching the vocabulary sdist, before generating or timing anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PAW_LITE_LLAMA_SDIST"}
    (tmp_path / "no-wheels").mkdir()
    env.update(PAW_LITE_TEST_CACHE=str(tmp_path / "test-cache"), PIP_CONFIG_FILE=os.devnull,  # no config's find-links
               PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "no-wheels"), PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_RETRIES="0", PIP_DISABLE_PIP_VERSION_CHECK="1", **env_vars)
    return subprocess.run([sys.executable, "-m", "paw_lite", "bench", "--quick", "--cache", str(tmp_path / "bench"), "--json"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_bench_reports_a_failed_vocab_download_as_one_error(tmp_path):
    r = _bench_without_vocab(tmp_path)
    assert r.returncode == 2, r.stderr
    error = json.loads(r.stdout)["error"]  # pip's own output stays off stdout
    sdist = tmp_path / "test-cache" / "llama_cpp_python-0.3.36.tar.gz"
    assert f"{sdist}: pip download failed (ERROR: " in error
    assert "set PAW_LITE_LLAMA_SDIST to a local copy of llama_cpp_python-0.3.36.tar.gz" in error
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "bench" / "workload.json").exists()


def test_bench_reports_an_unreadable_vocab_sdist_as_one_error(tmp_path):
    garbage = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    garbage.write_bytes(b"not a tar file\n" * 100)
    r = _bench_without_vocab(tmp_path, PAW_LITE_LLAMA_SDIST=str(garbage))
    assert r.returncode == 2, r.stderr
    error = json.loads(r.stdout)["error"]
    assert f"{garbage}: not a readable llama-cpp-python sdist (ReadError: " in error
    assert "set PAW_LITE_LLAMA_SDIST to a local copy" in error
    assert "Traceback" not in r.stderr


def test_the_product_floor_times_the_engine_products_on_loaded_weights(bench, tiny_gguf):
    """The floor rows: every matrix and the head, in the engine's product forms, on real weights.
    Only that it runs and reports what it says: its numbers are measurements, never asserted."""
    from paw_lite.base_model import BaseModel
    from paw_lite.gpt2_weights import Weights

    base = BaseModel.load(tiny_gguf)
    sampler = bench.ProductFloor(Weights.from_gguf_names(base.weights, base.config), n_prompt=5)
    for _ in range(2):
        sampler.sample()
    floor = sampler.result(n_out=3)
    assert len(sampler.prompt_s) == len(sampler.token_s) == 2
    assert set(floor) == {"one_call_floor_s", "decode_floor_tok_s"}
    assert floor["one_call_floor_s"] > 2 / floor["decode_floor_tok_s"] > 0  # the prompt plus two decoded tokens


# -- benchmarks/constrained_bench.py (`paw-lite bench --constrained`) --------------------------

@pytest.fixture(scope="module")
def cbench():
    from paw_lite.cli.bench import CONSTRAINED_SCRIPT

    return bench_module(CONSTRAINED_SCRIPT)


def test_constrained_labels_are_one_to_three_tokens(cbench, tok):
    for label in cbench.LABELS:
        for text in (label, " " + label):
            assert 1 <= len(tok.encode(text)) <= 3, text


def test_the_mask_processor_keeps_exactly_the_allowed_logits(cbench, tiny_gguf):
    """The official way's logits processor: -inf outside the constraint state's allowed ids, the
    logits themselves inside, for the state of the tokens after the prompt in input_ids, whether
    it advances its state or has to rebuild it for a history it has not seen."""
    choices, schema = cbench.official_matchers(tiny_gguf)
    rng = np.random.default_rng(0)
    prompt = [464, 3290, 318]
    for matcher in (choices, schema):
        proc = cbench.MaskProcessor(matcher, len(prompt))
        out: list[int] = []
        for _ in range(40):
            scores = rng.standard_normal(50257).astype(np.float32)
            masked = proc(np.array(prompt + out, np.intc), scores.copy())
            fresh = matcher.start()
            for t in out:
                fresh.advance(t)
            allowed = fresh.allowed()
            assert len(allowed) and np.flatnonzero(np.isfinite(masked)).tolist() == allowed.tolist()
            assert np.array_equal(masked[allowed], scores[allowed])
            token = int(np.argmax(masked))
            if token == 50256:
                break
            out.append(token)
            if proc.state(out).finished:
                break
        assert fresh.complete or proc.state(out).finished
        assert cbench.valid_output("choices" if matcher is choices else "json_schema",
                                   b"".join(matcher.table.token_bytes[t] for t in out).decode("utf-8"))
        # Another history than the one it followed: rebuilt from scratch, not advanced on top.
        other = out[:1]
        masked = proc(np.array(prompt + other, np.intc), np.zeros(50257, np.float32))
        fresh = matcher.start()
        fresh.advance(other[0])
        assert np.flatnonzero(np.isfinite(masked)).tolist() == fresh.allowed().tolist()


def test_the_official_way_on_llama_cpp_gives_paw_lite_s_constrained_outputs(cbench, tiny_program, tiny_gguf, tiny_lora,
                                                                             tmp_path):
    """The official way (llama.cpp eval + sample with the masking processor) on the tiny model
    and its adapter: valid outputs, the same ids as paw_lite's constrained calls, and one sampled
    token per output token (the loop stops where the output is finished, and never evaluates
    anything after it)."""
    import paw_lite
    from paw_lite.constraints import IncompleteOutputError
    from paw_lite.lora import write_adapter_gguf

    adapter = write_adapter_gguf(tmp_path / "adapter.gguf", tiny_lora, 16.0, "f32")
    choices, schema = cbench.official_matchers(tiny_gguf)
    with paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path / "c") as fn:
        prefix = fn._prefix_ids
        w = cbench.ib.Workload(tiny_gguf, adapter, tiny_program, prefix, [], {})
        eng = cbench.ib._Llama(w)
        try:
            eng.eval_prefix()
            for text in ["ok", "disk usage at 99% on /var", "user logged in", "kernel panic - not syncing", "ünïcödé ✓"]:
                ids = fn.prompt_ids(text)
                assert ids[:len(prefix)] == prefix
                for kind, matcher, limit, kwargs in (
                        ("choices", choices, cbench.CHOICE_LIMIT, {"choices": list(cbench.LABELS)}),
                        ("json_schema", schema, cbench.SCHEMA_LIMIT, {"json_schema": cbench.SCHEMA})):
                    try:
                        ours = fn.generate_ids(text, max_tokens=limit, **kwargs)
                    except IncompleteOutputError as err:
                        ours = err.ids
                    eng.llm.n_tokens = len(prefix)
                    proc = cbench.MaskProcessor(matcher, len(ids))
                    theirs = cbench.official_generate(eng.llm, ids[len(prefix):], limit, proc)
                    assert theirs == ours, (text, kind)
                    assert cbench.valid_output(kind, fn.tokenizer.decode(theirs)), (text, kind, fn.tokenizer.decode(theirs))
                    assert proc.calls == len(theirs)  # complete = finished here: no sample for an EOS
                    assert cbench.official_call(eng, ids, matcher, limit) == theirs  # the benchmark's entry point
        finally:
            eng.close()


def test_constrained_report_shows_ratios_targets_and_agreement(cbench):
    def row(key, p, o, lower=True):
        return {"key": key, "label": key, "unit": "s" if lower else "calls/s", "lower_is_better": lower,
                "paw_lite": p, "official": o, "ratio": p / o, "samples": {}}

    decode = {1: "ALERT", 2: " INFO", 3: "QUI", 4: '{"label":"INFO","severity":"low"}', 5: '{"label":"INFO"}'}
    dec = lambda ids: "".join(decode[i] for i in ids)  # noqa: E731
    agreement = [cbench.compare("choices", [[1], [2], [3]], [[1], [1], [3]], dec),
                 cbench.compare("json_schema", [[4], [5]], [[4], [5]], dec)]
    for a in agreement:
        a["what"] = "test"
    assert agreement[0]["identical"] == 2 and agreement[0]["differ"][0]["input"] == 1
    assert agreement[0]["valid_paw_lite"] == 2 and agreement[1]["valid_official"] == 1
    result = {
        "rows": [row("choices_call_s", 0.1, 0.2), row("schema_call_s", 0.3, 0.4), row("map_calls_s", 30.0, 3.0, False),
                 row("free_call_s", 0.25, 0.2)],
        "agreement": agreement, "map_equals_calls": "7/7", "official_mask_s_per_call": {"choices": 0.002, "schema": 0.0051},
        "conditions": {"repeats": 3, "inner": 7, "calls": 256, "batch_size": 128, "llama_n_threads": 2, "cpus": 2,
                       "loadavg_before": (0.5, 0, 0), "loadavg_after": (1.5, 0, 0), "numpy": "2", "llama_cpp_python": "0.3.36"},
    }
    text = cbench.format_table(result)
    assert "| choices_call_s | 100 ms | 200 ms | 0.50x |" in text
    assert "| map_calls_s | 30.0 calls/s | 3.0 calls/s | 10.00x |" in text
    assert "target choices_call_s: ratio <= 0.6: met (0.50)" in text
    assert "target schema_call_s: ratio <= 0.6: NOT met (0.75)" in text
    assert "target map_calls_s: ratio >= 8: met (10.00)" in text
    assert "2/3 identical to the official way's" in text and "differ at inputs 1 (token 0: ' INFO' vs 'ALERT')" in text
    assert "load average 0.50 before, 1.50 after" in text
    assert "took 2.0 ms of its choices call and 5.1 ms of its schema call" in text


def test_bench_constrained_checks_its_options(capsys):
    assert main(["bench", "--constrained", "--calls", "0"]) == 2
    assert "--calls must be at least 1" in capsys.readouterr().err
