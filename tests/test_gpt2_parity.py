"""The NumPy GPT-2 against transformers (fp32, same weights): logits within 1e-4 max abs,
with and without a LoRA (PEFT on the transformers side); KV-cache decode against recomputation."""

from __future__ import annotations

import numpy as np

from oracles import oracle
from paw_lite.base_model import BaseModel
from paw_lite.gpt2 import KVCache, forward
from paw_lite.lora import LoraAdapter, write_adapter_gguf, write_peft_dir

from oracles import oracle

torch = oracle("torch")
oracle("transformers", "peft")

LOGIT_TOL = 1e-4
IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 50256, 318, 257, 1332]


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_logits_match_transformers_from_hf_folder_and_gguf(tiny_hf, tiny_gguf):
    from transformers import GPT2LMHeadModel

    ref = hf_logits(GPT2LMHeadModel.from_pretrained(tiny_hf).eval(), IDS)
    for source in (tiny_hf, tiny_gguf):
        base = BaseModel.load(source)
        ours = forward(IDS, base.weights, base.config, KVCache(base.config), 0, all_logits=True)
        assert ours.dtype == np.float32
        assert np.abs(ours - ref).max() < LOGIT_TOL, source


def test_logits_with_lora_match_peft(tiny_hf, tiny_gguf, tiny_lora, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base = BaseModel.load(tiny_gguf)
    write_adapter_gguf(tmp_path / "adapter.gguf", tiny_lora, 16.0, "f32")
    adapter = LoraAdapter.from_gguf(tmp_path / "adapter.gguf", base.config)
    assert adapter.rank == 32 and adapter.scale == 0.5
    write_peft_dir(tmp_path / "peft", adapter)
    hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_hf), tmp_path / "peft").eval()
    ref = hf_logits(hf, IDS)
    merged = adapter.merged_into(base.weights, base.config)
    ours = forward(IDS, merged, base.config, KVCache(base.config), 0, all_logits=True)
    plain = forward(IDS, base.weights, base.config, KVCache(base.config), 0, all_logits=True)
    assert np.abs(ours - plain).max() > 1.0, "the LoRA must change the logits for this test to mean anything"
    assert np.abs(ours - ref).max() < LOGIT_TOL
    # the PEFT folder reads back to the same adapter: hyperparameters and tensors
    again = LoraAdapter.from_peft_dir(tmp_path / "peft", base.config)
    assert (again.rank, again.alpha, again.scale) == (32, 16.0, 0.5)
    for name, arr in adapter.tensors().items():
        np.testing.assert_array_equal(again.tensors()[name], arr)


def test_kv_cache_decode_equals_recomputation(tiny_gguf):
    base = BaseModel.load(tiny_gguf)
    full = forward(IDS, base.weights, base.config, KVCache(base.config), 0, all_logits=True)
    cache = KVCache(base.config)
    step = [forward(IDS[:5], base.weights, base.config, cache, 0)]
    for pos in range(5, len(IDS)):
        step.append(forward([IDS[pos]], base.weights, base.config, cache, pos))
    np.testing.assert_allclose(np.stack(step), full[4:], atol=2e-5, rtol=0)


def test_prefill_after_a_cached_part_equals_recomputation(tiny_gguf):
    """Several tokens evaluated at n_past > 0 (a prompt after a cached prefix, as `paw-lite doctor`
    runs it): each query sees the cached keys and its own past, not its future."""
    base = BaseModel.load(tiny_gguf)
    full = forward(IDS, base.weights, base.config, KVCache(base.config), 0, all_logits=True)
    cache = KVCache(base.config)
    forward(IDS[:5], base.weights, base.config, cache, 0)
    rest = forward(IDS[5:], base.weights, base.config, cache, 5, all_logits=True)
    np.testing.assert_allclose(rest, full[5:], atol=2e-5, rtol=0)


def test_base_weights_untouched_by_merge(tiny_gguf, tiny_lora, tmp_path):
    base = BaseModel.load(tiny_gguf)
    before = base.weights["blk.0.attn_qkv.weight"].copy()
    write_adapter_gguf(tmp_path / "a.gguf", tiny_lora, 16.0, "f32")
    LoraAdapter.from_gguf(tmp_path / "a.gguf", base.config).merged_into(base.weights, base.config)
    np.testing.assert_array_equal(base.weights["blk.0.attn_qkv.weight"], before)
