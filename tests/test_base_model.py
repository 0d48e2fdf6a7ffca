"""Loading the interpreter: every supported tensor type, hyperparameters from the file, and files
that disagree with themselves rejected with a clear error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from paw_lite.base_model import BaseModel
from paw_lite.convert.gpt2 import write_gpt2_gguf
from paw_lite.errors import IncompatibleModelError, InvalidFileError
from paw_lite.gpt2 import KVCache, forward

from conftest import TEMPLATE
from llama_oracle import llama_greedy

IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
# Max abs logit difference to the F32 file, measured on the tiny model (max |logit| 7.8):
# F16 6.0e-3, BF16 5.6e-2, Q8_0 1.4e-1; the bounds leave a margin of about 3x.
TYPE_TOL = {GGMLQuantizationType.F16: 2e-2, GGMLQuantizationType.BF16: 0.15, GGMLQuantizationType.Q8_0: 0.4}


def rewrite(tiny_gguf, out, *, config_change=None, tensor_change=None, qtype=GGMLQuantizationType.F32):
    base = BaseModel.load(tiny_gguf)
    config = dataclasses.replace(base.config, **(config_change or {}))
    tensors = dict(base.weights)
    if tensor_change:
        tensor_change(tensors)
    tok = base.tokenizer
    fields = GGUFReader(tiny_gguf).fields
    tokens, merges = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.merges"].contents()
    return write_gpt2_gguf(out, config, tensors.items(), tokens, merges, list(tok.special.values()), tok.eos_id, qtype)


@pytest.mark.parametrize("qtype", list(TYPE_TOL))
def test_tensor_types_load_close_to_f32(tiny_gguf, tmp_path, qtype):
    ref_base = BaseModel.load(tiny_gguf)
    ref = forward(IDS, ref_base.weights, ref_base.config, KVCache(ref_base.config), 0, all_logits=True)
    path = rewrite(tiny_gguf, tmp_path / f"{qtype.name}.gguf", qtype=qtype)
    base = BaseModel.load(path)
    assert base.config == ref_base.config
    ours = forward(IDS, base.weights, base.config, KVCache(base.config), 0, all_logits=True)
    diff = np.abs(ours - ref).max()
    assert 0 < diff < TYPE_TOL[qtype], diff


def test_q8_0_greedy_equals_llama_cpp(tiny_gguf, tmp_path):
    path = rewrite(tiny_gguf, tmp_path / "q8.gguf", qtype=GGMLQuantizationType.Q8_0)
    base = BaseModel.load(path)
    ids = base.tokenizer.encode(TEMPLATE.replace("{INPUT_PLACEHOLDER}", "disk full"))
    cache = KVCache(base.config)
    logits = forward(ids, base.weights, base.config, cache, 0)
    ours = []
    for pos in range(len(ids), len(ids) + 12):
        ours.append(int(np.argmax(logits)))
        logits = forward([ours[-1]], base.weights, base.config, cache, pos)
    assert ours == llama_greedy(path, None, ids, 12, base.config.n_ctx, eos=-1)


@pytest.mark.parametrize("change, message", [
    (dict(config_change={"n_ctx": 64}), r"position_embd\.weight has shape \(128, 64\), expected \(64, 64\)"),
    (dict(config_change={"n_embd": 32, "n_ff": 128}), r"token_embd\.weight has shape \(50257, 64\), expected \(50257, 32\)"),
    (dict(config_change={"n_layer": 3}), r"tensor blk\.2\.attn_norm\.weight is missing"),
    (dict(config_change={"n_head": 5}), r"embedding width 64 is not divisible by 5 heads"),
    (dict(tensor_change=lambda t: t.__setitem__("blk.0.extra.weight", np.zeros(4, np.float32))), r"unexpected tensors for a GPT-2 model: blk\.0\.extra\.weight"),
    (dict(tensor_change=lambda t: t.__setitem__("token_embd.weight", t["token_embd.weight"][:50000])), r"token_embd\.weight has shape \(50000, 64\), expected \(50257, 64\)"),
])
def test_self_inconsistent_files_are_rejected(tiny_gguf, tmp_path, change, message):
    path = rewrite(tiny_gguf, tmp_path / "bad.gguf", **change)
    with pytest.raises(InvalidFileError, match=message) as exc:
        BaseModel.load(path)
    assert "bad.gguf" in str(exc.value)


def test_other_architecture_is_refused(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "llama.gguf"
    w = GGUFWriter(path, "llama")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(IncompatibleModelError, match="architecture is 'llama'; the interpreter runs GPT-2"):
        BaseModel.load(path)


def test_an_adapter_is_refused_as_the_interpreter_saying_what_it_is(tiny_lora, tmp_path):
    """A program's adapter.gguf names the 'gpt2' architecture too: it used to fail on a missing
    gpt2.embedding_length instead of saying what the file is."""
    from gguf import GGUFWriter

    from paw_lite.base_model import read_header
    from paw_lite.lora import write_adapter_gguf

    adapter = write_adapter_gguf(tmp_path / "adapter.gguf", tiny_lora, 16.0, "f32")
    no_arch = tmp_path / "no-arch.gguf"  # an adapter from another writer, without general.architecture
    w = GGUFWriter(no_arch, "gpt2")
    w.kv_data[0].pop("general.architecture")
    w.add_string("adapter.type", "lora")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for path in (adapter, no_arch):
        for load in (BaseModel.load, read_header):
            with pytest.raises(IncompatibleModelError) as info:
                load(path)
            assert str(info.value) == (f"{path}: is a LoRA adapter, not a base model; "
                                       f"pass the interpreter GGUF (gpt2-q8_0.gguf) instead")


def test_a_tokenizer_that_disagrees_with_the_vocabulary_size_is_an_error(tiny_gguf, monkeypatch):
    """The two readings of tokenizer.ggml.tokens are compared with a real check (an assert vanishes
    under python -O, and the model would run with embeddings the tokenizer cannot index)."""
    from paw_lite.tokenizer import GPT2Tokenizer

    real = GPT2Tokenizer.from_gguf

    def short(reader, path):
        tok = real(reader, path)
        tok.n_vocab -= 1
        return tok

    monkeypatch.setattr(GPT2Tokenizer, "from_gguf", short)
    with pytest.raises(InvalidFileError, match="the tokenizer has 50256 tokens but tokenizer.ggml.tokens lists 50257"):
        BaseModel.load(tiny_gguf)


def test_a_folder_without_config_json_says_what_it_should_hold(tmp_path):
    from paw_lite.base_model import read_header
    from paw_lite.hf_gpt2 import hf_gpt2_config
    from paw_lite.errors import ModelNotFoundError

    empty = tmp_path / "empty"
    empty.mkdir()
    runs = "an HF GPT-2 folder (config.json, model.safetensors, tokenizer files) or a GPT-2 .gguf"
    for load in (BaseModel.load, read_header):
        with pytest.raises(ModelNotFoundError) as info:
            load(empty)
        assert str(info.value) == f"{empty}: no config.json; pass {runs}"
    converts = "an HF GPT-2 folder (config.json, model.safetensors or pytorch_model.bin, tokenizer files)"
    with pytest.raises(ModelNotFoundError) as info:
        hf_gpt2_config(tmp_path / "nope" / "config.json")
    assert str(info.value) == f"{tmp_path / 'nope'}: not a folder; pass {converts}"
    (empty / "config.json").mkdir()
    with pytest.raises(InvalidFileError) as info:  # the system's reason, without the path again
        hf_gpt2_config(empty / "config.json")
    assert str(info.value) == f"{empty / 'config.json'}: cannot read the model config: Is a directory"


def test_hf_folder_hyperparameters_come_from_config(tiny_hf):
    base = BaseModel.load(tiny_hf)
    assert (base.config.n_layer, base.config.n_embd, base.config.n_head, base.config.n_ctx) == (2, 64, 4, 128)
    assert "output.weight" not in base.weights  # tied
