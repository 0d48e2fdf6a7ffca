"""Hostile or unusual model files found by review: each is refused with an InvalidFileError (or a
PawError) naming the file, never a traceback, a hang or an output left behind."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from oracles import oracle
from paw_lite.base_model import BaseModel
from paw_lite.cli import main
from paw_lite.errors import InvalidFileError, PawError
from paw_lite.gpt2_layout import GPT2Config
from paw_lite.lora import LoraAdapter, write_peft_dir
from paw_lite.safetensors_file import SafetensorsFile

from conftest import random_lora


def safetensors_bytes(header: dict | str, data: bytes = b"") -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("header, data, match", [
    ({"w": {"dtype": [], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
    ("[" * 100_000 + "]" * 100_000, b"", "not valid JSON"),
    ({"w": {"dtype": "F32", "shape": [2 ** 62 + 1, 4], "data_offsets": [0, 16]}}, b"\0" * 16, "inconsistent with the file"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, b"\0" * 16, "not whole numbers"),
    ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "not whole numbers"),
])
def test_malformed_safetensors_headers(tmp_path, header, data, match):
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    with pytest.raises(InvalidFileError, match=match):
        SafetensorsFile(path)


def test_a_gguf_or_a_zip_given_as_safetensors_is_named_as_such(tmp_path, tiny_gguf, tiny_program):
    """--mapper pointing at a GGUF said "header length 14064895815 exceeds ..."."""
    with pytest.raises(InvalidFileError, match="this is a GGUF file, not a safetensors file"):
        SafetensorsFile(tiny_gguf)
    with pytest.raises(InvalidFileError, match=r"this is a zip \(a torch checkpoint or a \.paw\?\) file, not a safetensors"):
        SafetensorsFile(tiny_program)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_a_fifo_safetensors_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(InvalidFileError, match="not a regular file"):
        SafetensorsFile(tmp_path / "model.safetensors")


def test_hf_folders_with_wrong_json_or_nan_weights(tmp_path, tiny_hf):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf, folder)
    (folder / "config.json").write_text("[]")
    with pytest.raises(InvalidFileError, match=r"config.json: is a JSON list, expected an object"):
        BaseModel.load(folder)
    shutil.copy(tiny_hf / "config.json", folder / "config.json")

    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tiny_hf / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("ln_f.bias"))
    tensors[key] = tensors[key].copy()
    tensors[key][0] = np.nan
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(InvalidFileError, match=f"model.safetensors: tensor {key} holds NaN or Inf values"):
        BaseModel.load(folder)  # the GGUF path refused NaN already; an HF folder answered "!!!!!"

    tensors = load_file(str(tiny_hf / "model.safetensors"))
    tensors["score.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(InvalidFileError, match=r"model.safetensors: unknown GPT-2 tensor 'score.weight'"):
        BaseModel.load(folder)


def test_a_gguf_tokenizer_list_stored_as_a_number(tmp_path, tiny_gguf):
    """The generic net: a value of the wrong type deep in a parser is an InvalidFileError naming the file."""
    import gguf

    reader = gguf.GGUFReader(tiny_gguf)
    out = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(out), "gpt2")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "tokenizer.ggml.token_type":
            writer.add_int32(name, 1)
            continue
        value, vtype = field.contents(), field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InvalidFileError, match=r"types.gguf: tokenizer.ggml.token_type is not a list of int"):
        BaseModel.load(out)


@pytest.mark.parametrize("edit, match", [
    ({"r": "abc"}, "not a valid PEFT LoRA folder"),
    ({"lora_alpha": [1]}, "not a valid PEFT LoRA folder|alpha"),
])
def test_peft_configs_with_wrong_types(tmp_path, edit, match):
    from paw_lite.lora import _pair_up

    config = GPT2Config(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_ff=256, eps=1e-5)
    folder = write_peft_dir(tmp_path / "peft", LoraAdapter(_pair_up(random_lora(2, 64, 8)), 16.0, 8, "F32", "memory"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(InvalidFileError, match=match):
        LoraAdapter.from_peft_dir(folder, config)
    (folder / "adapter_config.json").write_text("[1]")
    with pytest.raises(InvalidFileError, match="is a JSON list, expected an object"):
        LoraAdapter.from_peft_dir(folder, config)


def test_convert_refuses_to_write_over_its_source(tmp_path, tiny_hf, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf, folder)
    before = (folder / "model.safetensors").read_bytes()
    assert main(["convert", "gpt2", str(folder), "-o", str(folder / "model.safetensors")]) == 2
    assert "would write over the source" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == before
    # a conversion into the source folder is fine, and so is running it again over its own .gguf
    for _ in range(2):
        assert main(["convert", "gpt2", str(folder), "-o", str(folder / "model.gguf"), "--type", "f32"]) == 0
        capsys.readouterr()
    assert (folder / "model.safetensors").read_bytes() == before


def test_a_converted_file_that_fails_its_check_is_removed(tmp_path, tiny_hf, capsys):
    """A vocabulary padded past the tokenizer (nanoGPT's 50304) used to leave a GGUF llama.cpp refuses."""
    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf, folder)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("wte.weight"))
    tensors[key] = np.concatenate([tensors[key], np.zeros((3, tensors[key].shape[1]), np.float32)])
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 3}))
    out = tmp_path / "out" / "pad.gguf"
    assert main(["convert", "gpt2", str(folder), "-o", str(out), "--type", "f32"]) == 2
    err = capsys.readouterr().err
    assert "was removed" in err and not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_stale_temporaries_of_one_output_are_swept(tmp_path):
    from paw_lite.atomic import remove_stale_temporaries

    mine, other = tmp_path / ".qwen.gguf.abc.tmp", tmp_path / ".notes.txt.def.tmp"
    mine.mkdir()
    (mine / "intermediate-f32.gguf").write_bytes(b"x")
    other.write_bytes(b"x")
    for p in (mine, other):
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_temporaries(tmp_path, prefix=".qwen.gguf.") == 1
    assert not mine.exists() and other.exists()


def test_k_quants_need_llama_cpp_before_any_writing(tmp_path, monkeypatch, tiny_hf):
    import paw_lite.convert.qwen3 as qwen3
    from paw_lite.errors import MissingDependencyError

    def missing(module, extra):
        raise MissingDependencyError(f"{module} is needed")

    monkeypatch.setattr(qwen3, "require", missing)
    monkeypatch.setattr(qwen3, "Qwen3Source", lambda folder: type("S", (), {"dtype_names": lambda self: {"F32"}})())
    with pytest.raises(MissingDependencyError):
        qwen3.convert_qwen3(tmp_path, tmp_path / "out" / "q.gguf", "q4_k_m")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["model.safetensors", "pytorch_model.bin"])
def test_convert_gpt2_refuses_nan_weights(tmp_path, tiny_hf, source):
    from paw_lite.convert.gpt2 import convert_hf_gpt2
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("ln_f.bias"))
    tensors[key] = tensors[key].copy()
    tensors[key][0] = np.inf
    if source == "model.safetensors":
        save_file(tensors, str(folder / source))
    else:
        torch = oracle("torch")
        (folder / "model.safetensors").unlink()
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / source)
    out = tmp_path / "x.gguf"
    with pytest.raises(InvalidFileError, match="holds NaN or Inf values"):
        convert_hf_gpt2(folder, out, "f32")
    assert not out.exists()
