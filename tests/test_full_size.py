"""Full-size random GPT-2 (12 layers, 768 wide, 2048 positions, real vocabulary): logits against
transformers within 1e-4, from the HF folder and from the official-layout GGUF (F32), including
positions past GPT-2's original 1024."""

from __future__ import annotations

import numpy as np
import pytest

from oracles import oracle
from paw_lite.base_model import BaseModel
from paw_lite.gpt2 import KVCache, forward

from conftest import make_hf_gpt2

torch = oracle("torch")
oracle("transformers")

LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def full_hf(tmp_path_factory, hf_tokenizer_dir):
    return make_hf_gpt2(tmp_path_factory.mktemp("full_hf"), hf_tokenizer_dir, n_layer=12, n_embd=768, n_head=12,
                        n_ctx=2048, init_std=0.02)


def test_full_size_logits_match_transformers(full_hf, tmp_path):
    from transformers import GPT2LMHeadModel

    from paw_lite.convert.gpt2 import convert_hf_gpt2

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50256, size=1100).tolist()
    hf = GPT2LMHeadModel.from_pretrained(full_hf).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ref_head, ref_last = ref[:16].numpy(), ref[-1].numpy()
    del hf, ref
    gguf_path = convert_hf_gpt2(full_hf, tmp_path / "full-f32.gguf", "f32")
    for source in (full_hf, gguf_path):
        base = BaseModel.load(source)
        assert (base.config.n_layer, base.config.n_embd, base.config.n_ctx, base.config.n_vocab) == (12, 768, 2048, 50257)
        last = forward(ids, base.weights, base.config, KVCache(base.config), 0)
        head = forward(ids[:16], base.weights, base.config, KVCache(base.config), 0, all_logits=True)
        assert np.abs(last - ref_last).max() < LOGIT_TOL, source
        assert np.abs(head - ref_head).max() < LOGIT_TOL, source
        del base
