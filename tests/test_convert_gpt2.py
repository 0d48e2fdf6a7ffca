"""GPT-2 from `pytorch_model.bin` (read by the torch-free reader) gives the same GGUF tensors as from
`model.safetensors`; wrong or unsafe checkpoints leave no file; the CLI summarises and verifies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oracles import oracle
from paw_lite.convert.gguf_meta import read_gguf_meta
from paw_lite.convert.gpt2 import convert_hf_gpt2
from paw_lite.convert.verify import verify_gguf
from paw_lite.errors import InvalidFileError

torch = oracle("torch")
oracle("transformers")


@pytest.fixture(scope="module")
def bin_folder(tmp_path_factory, tiny_hf) -> Path:
    """tiny_hf re-saved the pre-safetensors way: pytorch_model.bin (torch zip), lm_head tied."""
    from transformers import GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2_bin")
    for f in tiny_hf.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    model = GPT2LMHeadModel.from_pretrained(tiny_hf)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # what save_pretrained wrote before safetensors
    return folder


def tensor_bytes(path: Path) -> dict[str, bytes]:
    meta = read_gguf_meta(path)
    with open(path, "rb") as f:
        out = {}
        for name, t in meta.tensors.items():
            f.seek(t.offset)
            out[name] = (t.qtype, t.shape, f.read(t.nbytes))
    return out


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_bin_equals_safetensors(tmp_path, tiny_hf, bin_folder, qtype):
    a = convert_hf_gpt2(tiny_hf, tmp_path / "st.gguf", qtype)
    b = convert_hf_gpt2(bin_folder, tmp_path / "bin.gguf", qtype)
    ta, tb = tensor_bytes(a), tensor_bytes(b)
    assert sorted(ta) == sorted(tb) and "output.weight" not in tb  # tied output dropped in both
    assert all(ta[n] == tb[n] for n in ta)
    fa, fb = read_gguf_meta(a).fields, read_gguf_meta(b).fields
    assert fa == fb
    info = verify_gguf(b, "interpreter")
    assert info["n_layer"] == 2 and info["n_embd"] == 64


def test_bin_route_loads_in_llama_cpp(tmp_path, bin_folder):
    llama_cpp = oracle("llama_cpp")
    from transformers import GPT2LMHeadModel

    out = convert_hf_gpt2(bin_folder, tmp_path / "bin-f32.gguf", "f32")
    ids = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    ref_model = GPT2LMHeadModel.from_pretrained(bin_folder, use_safetensors=False).eval()
    with torch.no_grad():
        want = ref_model(torch.tensor([ids])).logits[0].numpy()
    # measured 4.1e-3 on logits of std ~1: ggml's GELU uses an fp16 table (LLAMA-CPP-NOTES)
    assert np.abs(got - want).max() < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("qtype, desc", [("f32", "all F32"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_file_type_is_what_llama_cpp_reports(tmp_path, tiny_hf, qtype, desc):
    """general.file_type is llama.cpp's file-type enum: Q8_0 was written as 8 (the Q8_0 tensor type),
    which llama.cpp reads as MOSTLY_Q5_0 and describes as "Q5_0"."""
    llama_cpp = oracle("llama_cpp")
    import ctypes

    out = convert_hf_gpt2(tiny_hf, tmp_path / f"{qtype}.gguf", qtype)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(out).encode(), llama_cpp.llama_model_default_params())
    assert model
    try:
        buf = ctypes.create_string_buffer(128)
        llama_cpp.llama_model_desc(model, buf, len(buf))
    finally:
        llama_cpp.llama_model_free(model)
    assert buf.value.decode().endswith(f" {desc}"), buf.value


def test_bad_bins_refused(tmp_path, bin_folder):
    out = tmp_path / "x.gguf"

    def variant(name: str, state) -> Path:
        d = tmp_path / name
        shutil.copytree(bin_folder, d)
        torch.save(state, d / "pytorch_model.bin")
        return d

    full = torch.load(bin_folder / "pytorch_model.bin", weights_only=True)
    missing = {k: v for k, v in full.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    with pytest.raises(InvalidFileError, match=r"missing tensors \['blk.1.ffn_up.weight'\]"):
        convert_hf_gpt2(variant("missing", missing), out, "f32")
    wrong = dict(full, **{"transformer.h.0.mlp.c_fc.bias": torch.zeros(7)})
    with pytest.raises(InvalidFileError, match=r"blk.0.ffn_up.bias has shape \(7,\), expected \(256,\)"):
        convert_hf_gpt2(variant("wrong", wrong), out, "f32")

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with pytest.raises(InvalidFileError, match="system.*refused"):
        convert_hf_gpt2(variant("evil", dict(full, extra=Payload())), out, "f32")
    assert not marker.exists() and not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_cli_convert_gpt2(tmp_path, bin_folder):
    out = tmp_path / "interp.gguf"
    r = subprocess.run([sys.executable, "-m", "paw_lite", "convert", "gpt2", str(bin_folder), "-o", str(out), "--type", "f16",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["arch"] == "gpt2" and info["tensor_types"] == {"F32": 19, "F16": 9}  # 8 matrices + token_embd and info["bytes"] == out.stat().st_size
    r = subprocess.run([sys.executable, "-m", "paw_lite", "convert", "gpt2", str(tmp_path / "none"), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "none: not a folder; pass an HF GPT-2 folder" in r.stderr and "Errno" not in r.stderr


def test_cli_convert_gpt2_says_what_the_source_should_be(tmp_path, capsys):
    """Not `nope/config.json: cannot read the model config: [Errno 2] ...`: what is wrong and what to pass."""
    from paw_lite.cli import main

    want = "pass an HF GPT-2 folder (config.json, model.safetensors or pytorch_model.bin, tokenizer files)"
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    for src, problem in (("nope", "not a folder"), ("empty", "no config.json"), ("model.gguf", "not a folder")):
        assert main(["convert", "gpt2", str(tmp_path / src), "-o", str(tmp_path / "out.gguf")]) == 2
        assert capsys.readouterr().err == f"paw-lite: error: {tmp_path / src}: {problem}; {want}\n"
    assert not (tmp_path / "out.gguf").exists()


def test_converted_tokenizer_works_in_llama_cpp(tiny_gguf, vocab_dir, hf_tokenizer_dir):
    """llama.cpp tokenizes text with the converted file's own vocabulary exactly as transformers
    does: the other llama.cpp oracles are fed paw_lite's token ids, so only this reads the
    tokenizer the converter wrote. tokenizer.ggml.pre picks llama.cpp's pre-tokenizer regex;
    "default" (a Llama-3-like split: digits in threes, no ' ?' before letters) breaks numbers,
    contractions and spaces. tiny_gguf comes from tiny_hf, which carries the real GPT-2 vocabulary."""
    llama_cpp = oracle("llama_cpp")
    from transformers import GPT2TokenizerFast  # transformers 5: the same class as GPT2Tokenizer

    from test_tokenizer import EXTRA_CASES, reference_cases

    fields = read_gguf_meta(tiny_gguf).fields
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    hf = GPT2TokenizerFast.from_pretrained(hf_tokenizer_dir)
    cases = reference_cases(vocab_dir, "ggml-vocab-gpt-2.gguf")
    assert len(cases) >= 40
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), vocab_only=True, verbose=False)
    try:
        for text, want in cases + [(text, hf.encode(text)) for text in EXTRA_CASES]:
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            assert got == want == hf.encode(text), text
    finally:
        llm.close()
