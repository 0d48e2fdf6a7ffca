"""Bad input to the forward passes, the engine and the LoRA merge is a clear PawError, not an
assert (asserts vanish under `python -O`) nor a deep NumPy traceback or a silent wrap-around
(a negative token id would index the embedding from its end)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from paw_lite.base_model import BaseModel
from paw_lite.engine import Engine, Sequence
from paw_lite.errors import ContextOverflowError, IncompatibleModelError, InvalidInputError, PawError
from paw_lite.gpt2 import KVCache, forward
from paw_lite.gpt2_weights import Weights


@pytest.fixture(scope="module")
def base(tiny_gguf):
    return BaseModel.load(tiny_gguf)


@pytest.fixture(scope="module")
def engine(base):
    eng = Engine.gpt2(Weights.from_gguf_names(base.weights, base.config), base.config)
    eng.set_prefix(*eng.eval_prefix([464, 2068, 7586]))
    return eng


def test_invalid_input_is_a_paw_error_and_a_value_error():
    assert issubclass(InvalidInputError, PawError) and issubclass(InvalidInputError, ValueError)


def test_reference_forward_refuses_what_does_not_fit(base):
    c = base.config
    with pytest.raises(ContextOverflowError, match=r"3 tokens after 126 cached ones pass the context of 128"):
        forward([1, 2, 3], base.weights, c, KVCache(c), c.n_ctx - 2)
    with pytest.raises(InvalidInputError, match="non-empty list of token ids"):
        forward([], base.weights, c, KVCache(c), 0)
    with pytest.raises(InvalidInputError, match=r"token id -1 is outside the vocabulary \(0\.\.50256\)"):
        forward([5, -1], base.weights, c, KVCache(c), 0)
    with pytest.raises(InvalidInputError, match="token id 50257 is outside"):
        forward([50257], base.weights, c, KVCache(c), 0)
    with pytest.raises(InvalidInputError, match=r"n_past is -1, expected 0\.\.128"):
        forward([5], base.weights, c, KVCache(c), -1)
    # the last position still fits
    assert forward([5], base.weights, c, KVCache(c), c.n_ctx - 1).shape == (c.n_vocab,)


@pytest.mark.parametrize("seqs, error, message", [
    ([Sequence([5], 0, 0)], InvalidInputError, r"sequence 0: limit is 0, expected at least 1"),
    ([Sequence([5], 0, 2), Sequence([5], 4, 2)], InvalidInputError, r"sequence 1: start is 4, expected 0\.\.3"),
    ([Sequence([5], -1, 2)], InvalidInputError, r"start is -1"),
    ([Sequence([], 3, 2)], InvalidInputError, r"sequence 0: no tokens after the prefix part"),
    ([Sequence([5] * 120, 3, 10)], ContextOverflowError, r"3 prefix tokens \+ 120 tokens \+ 10 to generate need 132 "
                                                          r"positions; the context holds 128"),
    ([Sequence([5, 50257], 3, 1)], InvalidInputError, r"token id 50257 is outside the vocabulary"),
    ([Sequence([-3], 3, 1)], InvalidInputError, r"token id -3 is outside the vocabulary"),
    ([Sequence([1.5], 3, 1)], InvalidInputError, r"token ids must be a flat list of integers"),
])
def test_engine_refuses_sequences_it_cannot_run(engine, seqs, error, message):
    with pytest.raises(error, match=message):
        engine.generate(seqs, eos=-1)


def test_prompt_logits_checks_its_sequences_too(engine):
    with pytest.raises(InvalidInputError, match="sequence 1: token id 50257 is outside"):
        engine.prompt_logits([Sequence([5], 3, 1), Sequence([50257], 3, 1)])


def test_engine_runs_what_just_fits(engine):
    # 3 prefix tokens + 120 own + 6 generated: the last generated token is never evaluated, 128 positions
    assert len(engine.generate([Sequence([5] * 120, 3, 6)], eos=-1)[0]) == 6


def test_engine_refuses_a_prefix_it_cannot_hold(engine, base):
    with pytest.raises(ContextOverflowError, match="the prefix is 129 tokens; the context holds 128"):
        engine.eval_prefix([5] * 129)
    with pytest.raises(InvalidInputError, match="the prefix: token id 99999 is outside"):
        engine.eval_prefix([5, 99999])


def test_merge_refuses_lora_pairs_that_do_not_fit(base, tiny_lora):
    targets = {name.rsplit(".weight.", 1)[0] for name in tiny_lora}
    pairs = {t: (tiny_lora[f"{t}.weight.lora_a"], tiny_lora[f"{t}.weight.lora_b"]) for t in targets}
    good = pairs["blk.0.ffn_up"]
    with pytest.raises(IncompatibleModelError, match=r"LoRA target 'blk\.2\.ffn_up' is not a module of this 2-layer GPT-2"):
        Weights.from_gguf_names(base.weights, base.config, {"blk.2.ffn_up": good})
    with pytest.raises(IncompatibleModelError, match=r"LoRA target 'blk\.0\.lm_head' is not a module"):
        Weights.from_gguf_names(base.weights, base.config, {"blk.0.lm_head": good})
    with pytest.raises(IncompatibleModelError, match=r"LoRA pair of blk\.0\.attn_qkv has shapes A \(32, 64\), B \(256, 32\); "
                                                     r"expected A \(r, 64\) and B \(192, r\)"):
        Weights.from_gguf_names(base.weights, base.config, {"blk.0.attn_qkv": good})
    merged = Weights.from_gguf_names(base.weights, base.config, pairs, 0.5)  # the same pairs, rightly placed
    assert not np.array_equal(merged.layers[0].ffn_up, base.weights["blk.0.ffn_up.weight"])


def test_checks_hold_under_python_O(tiny_gguf):
    """`python -O` strips asserts: the context check must still be there."""
    code = f"""
import sys
from paw_lite.base_model import BaseModel
from paw_lite.engine import Engine, Sequence
from paw_lite.errors import ContextOverflowError
from paw_lite.gpt2 import KVCache, forward
from paw_lite.gpt2_weights import Weights
if sys.flags.optimize < 1:
    sys.exit("asserts must be off for this test")
base = BaseModel.load({str(tiny_gguf)!r})
for run in (lambda: forward([5, 6], base.weights, base.config, KVCache(base.config), 127),
            lambda: Engine.gpt2(Weights.from_gguf_names(base.weights, base.config), base.config).generate(
                [Sequence([5] * 128, 0, 2)], eos=-1)):
    try:
        run()
    except ContextOverflowError as exc:
        print("refused:", exc)
    else:
        sys.exit("not refused under -O")
"""
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("refused:") == 2, r.stdout
