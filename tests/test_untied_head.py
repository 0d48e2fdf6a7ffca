"""A GPT-2 whose output head is its own matrix (`tie_word_embeddings: false`, an `output.weight`
tensor in the GGUF) rather than the token embedding: every other fixture is tied, where reading the
wrong matrix goes unnoticed. The converted file's logits must equal transformers' through the
reference forward pass, the engine and the runtime, and llama.cpp must read the file the same way."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from oracles import oracle
import paw_lite
from paw_lite.base_model import BaseModel
from paw_lite.convert.gguf_meta import read_gguf_meta
from paw_lite.convert.gpt2 import convert_hf_gpt2
from paw_lite.engine import Engine, Sequence
from paw_lite.gpt2_weights import Weights
from paw_lite.gpt2 import KVCache, forward
from paw_lite.lora import LoraAdapter, write_peft_dir
from paw_lite.program import Program

from conftest import hf_greedy

torch = oracle("torch")
oracle("transformers", "peft")

LOGIT_TOL = 1e-4  # NumPy fp32 against transformers fp32, as tests/test_gpt2_parity.py
# llama.cpp's GELU goes through an fp16 table: 4.1e-3 measured on tied logits of std ~1
# (tests/test_convert_gpt2.py), 4.8e-3 here (std 1.6); NumPy is 5.7e-6 off
LLAMA_TOL = 1e-2
IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 50256, 318, 257, 1332]


@pytest.fixture(scope="module")
def untied_hf(tmp_path_factory, tiny_hf) -> Path:
    """tiny_hf with an untied head: the same body, lm_head a seeded random matrix of wte's scale."""
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("untied_hf")
    # the checkpoint has no lm_head.weight: transformers reports it missing, and it is filled here
    model = GPT2LMHeadModel.from_pretrained(tiny_hf, tie_word_embeddings=False).eval()
    with torch.no_grad():
        head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.2
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_hf / f, folder / f)
    with safe_open(folder / "model.safetensors", "pt") as st:  # a separate head really stored
        stored = st.get_tensor("lm_head.weight")
        assert (stored - st.get_tensor("transformer.wte.weight")).abs().max() > 1.0
        assert torch.equal(stored, head)
    return folder


@pytest.fixture(scope="module")
def untied_gguf(tmp_path_factory, untied_hf) -> Path:
    out = convert_hf_gpt2(untied_hf, tmp_path_factory.mktemp("untied_gguf") / "untied-f32.gguf", "f32")
    assert "output.weight" in read_gguf_meta(out).tensors
    return out


@pytest.fixture(scope="module")
def hf_ref(untied_hf) -> np.ndarray:
    """transformers' logits (the oracle) at every position of IDS."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(untied_hf).eval()
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def test_reference_forward_uses_the_output_head(untied_hf, untied_gguf, hf_ref):
    for source in (untied_gguf, untied_hf):
        base = BaseModel.load(source)
        assert "output.weight" in base.weights, source
        ours = forward(IDS, base.weights, base.config, KVCache(base.config), 0, all_logits=True)
        assert np.abs(ours - hf_ref).max() < LOGIT_TOL, source
    # the head must matter for the test to mean anything: the embedding as head is far off
    tied = {n: a for n, a in base.weights.items() if n != "output.weight"}
    wrong = forward(IDS, tied, base.config, KVCache(base.config), 0, all_logits=True)
    assert np.abs(wrong - hf_ref).max() > 1.0


def test_engine_uses_the_output_head(untied_gguf, hf_ref):
    base = BaseModel.load(untied_gguf)
    engine = Engine.gpt2(Weights.from_gguf_names(base.weights, base.config), base.config)
    # one sequence per prompt length: row t is the logits after IDS[:t + 1], as the engine
    # evaluates a prompt before choosing its first token
    got = engine.prompt_logits([Sequence(IDS[:t + 1], 0, 1) for t in range(len(IDS))])
    assert np.abs(got - hf_ref).max() < LOGIT_TOL
    # embeddings still come from token_embd, not the head
    np.testing.assert_array_equal(engine.w.embed(np.array(IDS)), base.weights["token_embd.weight"][IDS])


def test_program_on_an_untied_base_equals_transformers_peft(untied_hf, untied_gguf, tiny_program, tmp_path):
    """The runtime path (paw_lite.function: the base consumed into the engine, a LoRA merged in)."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    with paw_lite.function(tiny_program, base_model=untied_gguf, cache_dir=tmp_path / "c") as fn:
        write_peft_dir(tmp_path / "peft", LoraAdapter.from_program(Program.load(tiny_program), fn.config))
        # a fresh model: PEFT wraps the one it is given in place
        hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(untied_hf), tmp_path / "peft").eval()
        outs = set()
        for text in ("disk usage at 99% on /var", "user logged in", "ünïcödé ✓"):
            ids = fn.prompt_ids(text)
            ours = fn.generate_ids(text, max_tokens=16)
            assert ours == hf_greedy(hf, ids, 16), text
            outs.add(tuple(ours))
    assert len(outs) > 1, "outputs should depend on the input"


def test_llama_cpp_reads_the_converted_output_head(untied_gguf, hf_ref):
    llama_cpp = oracle("llama_cpp")

    llm = llama_cpp.Llama(str(untied_gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(IDS)
        got = np.array(llm.scores[:len(IDS)])
    finally:
        llm.close()
    assert np.abs(got - hf_ref).max() < LLAMA_TOL
    assert (got.argmax(-1) == hf_ref.argmax(-1)).all()
