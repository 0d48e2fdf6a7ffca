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


def test_hf_folder_hyperparameters_come_from_config(tiny_hf):
    base = BaseModel.load(tiny_hf)
    assert (base.config.n_layer, base.config.n_embd, base.config.n_head, base.config.n_ctx) == (2, 64, 4, 128)
    assert "output.weight" not in base.weights  # tied
