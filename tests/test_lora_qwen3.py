"""Standard programs' adapters: adapter.gguf with general.architecture qwen3 (the 7 modules of each
layer) read, validated against a Qwen3Config and written; PEFT folders for Qwen3; and the family
checks (a GPT-2 adapter on Qwen3 and the reverse are refused with a message naming the file)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paw_lite.errors import IncompatibleModelError, InvalidFileError
from paw_lite.gpt2_layout import GPT2Config
from paw_lite.lora import LoraAdapter, adapter_gguf_bytes, describe_adapter_gguf, write_adapter_gguf, write_peft_dir
from paw_lite.qwen3_layout import LORA_MODULES, Qwen3Config
from paw_lite.testing.qwen3 import random_qwen3_lora

CONFIG = Qwen3Config(n_vocab=1000, n_ctx=256, n_embd=64, n_ff=96, n_layer=3, n_head=4, n_head_kv=2, head_dim=32,
                     eps=1e-6, rope_theta=1e6, tied=True)
GPT2 = GPT2Config(n_vocab=1000, n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_ff=256, eps=1e-5)
RANK = 32


@pytest.fixture(scope="module")
def tensors():
    return random_qwen3_lora(CONFIG, RANK)


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0"])
def test_qwen3_adapter_round_trip(tmp_path, tensors, kind):
    from gguf import GGUFReader, quants

    path = write_adapter_gguf(tmp_path / "adapter.gguf", tensors, 16.0, kind, arch="qwen3")
    adapter = LoraAdapter.from_gguf(path, CONFIG)
    assert (adapter.arch, adapter.rank, adapter.alpha, adapter.scale) == ("qwen3", RANK, 16.0, 0.5)
    assert adapter.tensor_type == kind.upper()
    assert len(adapter.pairs) == CONFIG.n_layer * len(LORA_MODULES) == 21
    assert list(adapter.tensors()) == list(tensors)  # the same stable order: layer, then the mapper's modules
    # gguf-py reads the same metadata and decodes the same values
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert reader.fields["adapter.lora.alpha"].contents() == 16.0
    for t in reader.tensors:
        want = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(tensors[t.name].shape)
        np.testing.assert_array_equal(adapter.tensors()[t.name], want)
    if kind == "f32":
        for name, arr in tensors.items():
            np.testing.assert_array_equal(adapter.tensors()[name], arr)
    # from memory, as a program's member, the same
    again = LoraAdapter.from_gguf_bytes(path.read_bytes(), CONFIG, "prog.paw: adapter.gguf")
    assert again.rank == RANK and all(np.array_equal(again.tensors()[n], a) for n, a in adapter.tensors().items())
    assert describe_adapter_gguf(path.read_bytes(), "x")["architecture"] == "qwen3"


def test_family_mismatch_is_refused(tmp_path, tensors):
    from conftest import random_lora

    qwen = write_adapter_gguf(tmp_path / "qwen.gguf", tensors, 16.0, "f32", arch="qwen3")
    with pytest.raises(IncompatibleModelError, match=r"qwen\.gguf: general\.architecture is 'qwen3', expected 'gpt2'.*GPT-2"):
        LoraAdapter.from_gguf(qwen, GPT2)
    gpt2 = write_adapter_gguf(tmp_path / "gpt2.gguf", random_lora(2, 64, 8), 16.0, "f32")
    with pytest.raises(IncompatibleModelError, match=r"gpt2\.gguf: general\.architecture is 'gpt2', expected 'qwen3'.*Qwen3"):
        LoraAdapter.from_gguf(gpt2, CONFIG)
    # GPT-2's fused attn_qkv under a qwen3 architecture is not a Qwen3 LoRA tensor
    qkv = {n: a for n, a in random_lora(2, 64, 8).items() if ".attn_qkv." in n}
    wrong = write_adapter_gguf(tmp_path / "wrong.gguf", qkv, 16.0, "f32", arch="qwen3")
    with pytest.raises(InvalidFileError, match=r"wrong\.gguf: tensor 'blk\.0\.attn_qkv\.weight\.lora_a' is not a Qwen3 LoRA tensor"):
        LoraAdapter.from_gguf(wrong, CONFIG)
    with pytest.raises(ValueError, match="llama"):
        adapter_gguf_bytes(tensors, 16.0, "f32", arch="llama")


def test_shapes_and_layers_are_checked(tmp_path, tensors):
    bad = dict(tensors)
    # attn_k's output is n_head_kv * head_dim = 64 rows, not n_head * head_dim = 128 (GQA)
    bad["blk.1.attn_k.weight.lora_b"] = np.zeros((128, RANK), np.float32)
    path = write_adapter_gguf(tmp_path / "bad.gguf", bad, 16.0, "f32", arch="qwen3")
    with pytest.raises(IncompatibleModelError, match=r"bad\.gguf: blk\.1\.attn_k\.weight\.lora_b has shape \(128, 32\), expected \(64, 32\)"):
        LoraAdapter.from_gguf(path, CONFIG)
    deep = {n.replace("blk.2.", "blk.3."): a for n, a in tensors.items()}
    path = write_adapter_gguf(tmp_path / "deep.gguf", deep, 16.0, "f32", arch="qwen3")
    with pytest.raises(IncompatibleModelError, match=r"targets layer 3; the base model has 3 layers"):
        LoraAdapter.from_gguf(path, CONFIG)


def test_peft_folder_round_trip(tmp_path, tensors):
    adapter = LoraAdapter.from_gguf(write_adapter_gguf(tmp_path / "a.gguf", tensors, 16.0, "f32", arch="qwen3"), CONFIG)
    folder = write_peft_dir(tmp_path / "peft", adapter)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "Qwen/Qwen3-0.6B" and cfg["fan_in_fan_out"] is False
    assert sorted(cfg["target_modules"]) == sorted(s for _, s in LORA_MODULES.values())
    from safetensors.numpy import load_file

    keys = set(load_file(str(folder / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.2.mlp.gate_proj.lora_B.weight" in keys and len(keys) == 42
    again = LoraAdapter.from_peft_dir(folder, CONFIG)
    assert (again.arch, again.rank, again.alpha) == ("qwen3", RANK, 16.0)
    for name, arr in adapter.tensors().items():
        np.testing.assert_array_equal(again.tensors()[name], arr)
    with pytest.raises(InvalidFileError, match="not a LoRA weight of a GPT-2 target module"):
        LoraAdapter.from_peft_dir(folder, GPT2)
