"""Full-size random Qwen3 (Qwen3-0.6B's shape: 28 layers, width 1024, 16 query / 8 kv heads of
head_dim 128, FFN 3072, 151,936 embedding rows, rope theta 1e6): the memory and shape check. Logits
of the reference forward and of the packed engine against transformers fp32 within 1e-4, on a short
prompt; transformers is freed before paw_lite loads, so the two models are never held together."""

from __future__ import annotations

import numpy as np
import pytest

from oracles import oracle
from paw_lite.engine import Engine, Sequence
from paw_lite.qwen3 import KVCache, forward
from paw_lite.qwen3_weights import load_qwen3
from paw_lite.testing.qwen3 import FULL_DIMS, IM_START_ID, sample_ids

torch = oracle("torch")
oracle("transformers")

LOGIT_TOL = 1e-4
pytestmark = pytest.mark.slow


def random_full_size_folder(folder):
    """An HF Qwen3 folder of Qwen3-0.6B's shape with random float16 weights (std 0.02, norms 1 +- 0.2),
    written with NumPy: building it through transformers' initialisation takes 4x as long."""
    from safetensors.numpy import save_file
    from transformers import Qwen3Config

    folder.mkdir()
    config = Qwen3Config(vocab_size=151936, num_hidden_layers=28, max_position_embeddings=40960, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
                         **FULL_DIMS)
    config.to_json_file(folder / "config.json")
    d, ff, q, kv, hd = 1024, 3072, 16 * 128, 8 * 128, 128
    shapes = {"model.embed_tokens.weight": (151936, d), "model.norm.weight": (d,)}
    for i in range(28):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d), p + "mlp.down_proj.weight": (d, ff)})
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape, dtype=np.float32)
        tensors[name] = (1.0 + 0.2 * x if len(shape) == 1 else 0.02 * x).astype(np.float16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_full_size_logits_match_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = random_full_size_folder(tmp_path / "full")
    ids = [int(t) for t in sample_ids(10, seed=4)] + [IM_START_ID, 151935]  # the last embedding row, past the tokens
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    del hf
    config, w = load_qwen3(folder)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_head_kv, config.head_dim, config.n_ff,
            config.n_vocab, config.rope_theta) == (28, 1024, 16, 8, 128, 3072, 151936, 1e6)
    ours = forward(ids, w, config, KVCache(config, 16), 0, all_logits=True)
    assert np.abs(ours - ref).max() < LOGIT_TOL
    engine = Engine.qwen3(w, config)
    engine.set_prefix(*engine.eval_prefix(ids[:5]))
    logits = engine.prompt_logits([Sequence(ids[5:], 5, 1), Sequence(ids[3:9], 3, 1)])
    assert np.abs(logits[0] - ref[-1]).max() < LOGIT_TOL
    assert np.abs(logits[1] - ref[8]).max() < LOGIT_TOL
