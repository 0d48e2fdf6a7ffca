"""benchmarks/standard_bench.py (`paw-lite bench --standard`) without running it: its vocabulary is
laid out as the published Qwen3-0.6B file's, its workload has the token counts it claims, its
official-way loop is the official runtime's (eval + sample(temp=0) until EOS), and its report
computes ratios and targets right. The measurement itself is never a timed test."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import TokenType

from paw_lite.cli import main
from paw_lite.cli.bench import STANDARD_SCRIPT, bench_module
from paw_lite.families import STANDARD
from paw_lite.testing.qwen3 import ENDOFTEXT_ID, IM_END_ID, IM_START_ID
from paw_lite.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def sbench():
    return bench_module(STANDARD_SCRIPT)


@pytest.fixture(scope="module")
def vocab(sbench, vocab_dir):
    return sbench._vocab()


@pytest.fixture(scope="module")
def tok(vocab):
    return BPETokenizer.from_token_types(vocab.tokens, vocab.token_types, vocab.merges, vocab.eos_id, "vocab", "qwen2",
                                         STANDARD)


def test_the_vocabulary_is_laid_out_as_qwen3_0_6b(sbench, vocab, tok):
    assert len(vocab.tokens) == sbench.qwen3_0_6b_config().n_vocab == 151936
    types = dict(zip(vocab.tokens, vocab.token_types))
    assert vocab.tokens[IM_START_ID] == "<|im_start|>" and types["<|im_end|>"] == TokenType.CONTROL
    assert types["<think>"] == TokenType.USER_DEFINED and vocab.tokens[151668] == "</think>"
    assert vocab.token_types[-1] == TokenType.UNUSED and vocab.eos_id == IM_END_ID
    assert tok.eos_ids == (IM_END_ID, ENDOFTEXT_ID)


def test_workload_has_the_stated_token_counts(sbench, tok):
    template, prefix_ids = sbench._template(tok)
    assert template.startswith("<|im_start|>user\n") and template.endswith("<think>\n\n</think>\n\n")
    prefix, suffix = template.split("{INPUT_PLACEHOLDER}")
    assert len(prefix_ids) == sbench.PREFIX_TOKENS == 250
    rng = np.random.default_rng(0)
    n_suffix = len(tok.encode_prompt(prefix, "", suffix)) - len(prefix_ids)
    for n in (sbench.INPUT_TOKENS, sbench.PREFILL_TOKENS):
        call = sbench.ib._prompt(tok, prefix, suffix, prefix_ids, sbench.ib._sentence(tok, rng, n))
        assert call["ids"][:250] == prefix_ids and len(call["ids"]) == 250 + n + n_suffix


class _FakeLlama:
    """Records the calls the official loop makes; samples the scripted tokens."""

    def __init__(self, script):
        self.script, self.log, self.n_tokens = list(script), [], 0

    def eval(self, ids):
        self.log.append(("eval", list(ids)))

    def sample(self, temp):
        assert temp == 0
        return self.script.pop(0)

    def token_eos(self):
        return IM_END_ID


def test_the_official_loop_is_eval_then_sample_until_eos(sbench):
    eng = sbench._Official.__new__(sbench._Official)
    eng.prefix = [1, 2, 3]
    eng.llm = _FakeLlama([10, 11, IM_END_ID])
    assert eng.call([1, 2, 3, 7, 8], 8) == [10, 11]
    assert eng.llm.log == [("eval", [7, 8]), ("eval", [10]), ("eval", [11])]
    eng.llm = _FakeLlama([10, 11, 12])
    assert eng.call([1, 2, 3, 7], 2) == [10, 11]


def test_report_shows_ratios_and_targets(sbench):
    def row(key, p, o, lower=True):
        return {"key": key, "label": key, "unit": "s" if lower else ("MiB" if "rss" in key else "calls/s"),
                "lower_is_better": lower, "paw_lite": p, "official": o, "ratio": None if o is None else p / o,
                "samples": {}}

    result = {
        "rows": [row("one_call_s", 0.8, 0.4), row("throughput_calls_s", 12.0, 3.0, False),
                 row("peak_rss_run_mb", 3000.0, 900.0), row("one_call_floor_s", 0.6, 0.4)],
        "agreement": {"inputs": 8, "tokens_each": 8, "identical_sequences": 7, "matching_tokens": 60, "total_tokens": 64,
                      "mean_tokens_before_first_difference": 7.5},
        "map_equals_one_by_one": "8/8",
        "conditions": {"repeats": 1, "inner": 3, "calls": 32, "batch_size": 128, "llama_n_threads": 2, "cpus": 2,
                       "loadavg_before": (4.5, 0, 0), "loadavg_after": (5.0, 0, 0), "numpy": "2", "llama_cpp_python": "0.3.36"},
    }
    text = sbench.format_table(result)
    assert "| throughput_calls_s | 12.0 calls/s | 3.0 calls/s | 4.00x |" in text
    assert "target throughput_calls_s: ratio >= 3: met (4.00)" in text
    assert "target peak_rss_run_mb: paw_lite <= 3052 MiB: met (3000.00)" in text
    assert "one call: 2.00x the official way's; paw_lite's float32 products alone take 1.50x" in text
    result["rows"][1:2] = [row("throughput_calls_s", 6.0, 3.0, False), row("throughput_floor_calls_s", 7.5, 3.0, False)]
    assert "target throughput_calls_s: ratio >= 3: NOT met (2.00); paw_lite's float32 products alone: 2.50" in \
        sbench.format_table(result)
    assert "load average 4.50 before, 5.00 after" in text and "7/8 identical sequences" in text


def test_bench_standard_and_constrained_exclude_each_other(capsys):
    assert main(["bench", "--standard", "--constrained"]) == 2


def test_the_map_floor_replays_the_maps_own_steps(sbench):
    """StepLog records what each step of a map evaluates (every prompt token and every output
    token but the last, one logits row per output token), puts the forward back, and times those
    steps' products alone."""
    from paw_lite.engine import Engine, Sequence
    from paw_lite.qwen3_layout import Qwen3Config
    from paw_lite.qwen3_packed import Qwen3Packed
    from paw_lite.qwen3_weights import Qwen3Weights

    config = Qwen3Config(n_vocab=300, n_ctx=128, n_embd=64, n_ff=96, n_layer=2, n_head=4, n_head_kv=2, head_dim=16,
                         eps=1e-6, rope_theta=1e4, tied=True)
    weights = Qwen3Weights.empty(config)
    rng = np.random.default_rng(0)
    for array in weights.tensor_views().values():
        array[...] = 0.1 * rng.standard_normal(array.shape, dtype=np.float32)
    engine = Engine.qwen3(weights, config)
    engine.set_prefix(*engine.eval_prefix([1, 2, 3]))
    seqs = [Sequence(rng.integers(0, 300, size=n).tolist(), 3, 4) for n in (2, 3, 5, 7, 1)]
    forward = Qwen3Packed.forward
    with sbench.StepLog() as log:
        outs = engine.generate(seqs, (), capacity=2)
    assert Qwen3Packed.forward is forward and [len(o) for o in outs] == [4] * 5
    steps = [step for own in log.by_thread.values() for step in own]
    assert sum(n for n, _ in steps) == sum(len(s.ids) + s.limit - 1 for s in seqs)
    assert sum(m for _, m in steps) == sum(s.limit for s in seqs)
    assert log.floor_s(weights) > 0
    with sbench.StepLog() as nothing:  # no Qwen3 step: no ceiling, rather than a division by ~0
        pass
    with pytest.raises(RuntimeError, match="no Qwen3 step was recorded"):
        nothing.floor_s(weights)
