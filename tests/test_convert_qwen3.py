"""HF Qwen3 -> GGUF: every type loads in llama.cpp, final hidden states match transformers, the
tokenizer matches HF token for token, metadata is complete, and bad inputs fail cleanly.

Oracle: transformers (fp32) on the same HF folder built by paw_lite/testing/qwen3.py. llama.cpp runs
with embeddings on, pooling NONE, an F32 KV cache and flash attention off, so the only differences
left are the weight type and llama.cpp's own arithmetic."""

from __future__ import annotations

import os
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from oracles import oracle
from paw_lite.errors import IncompatibleModelError, InvalidFileError, ModelNotFoundError
from paw_lite.testing.qwen3 import (CHAT_TEMPLATE, ENDOFTEXT_ID, FIRST_PREFIX_ID, IM_END_ID, IM_START_ID, N_VOCAB, PREFIX_TOKENS,
                           make_tiny_qwen3, reference_cases, sample_ids)

llama_cpp = oracle("llama_cpp")
oracle("transformers")
pytestmark = pytest.mark.llama

# Max abs difference of the final hidden states (after the last RMSNorm) from transformers fp32, on
# the bf16 fixture below (4 layers, width 256, random weights, 32 tokens; the reference values have
# std 1.0 and max |x| 4.8). Measured (this machine, llama.cpp 0c1e57098), then given ~1.5x headroom:
#   f32 7.9e-6 | f16 4.4e-3 | bf16 3.4e-2 | q8_0 0.20 | q6_k 0.50 | q5_k_m 0.84 | q4_k_m 1.84
# f16/bf16 hold the bf16 weights exactly: their error is llama.cpp rounding activations to f16/bf16.
TOLERANCE = {"f32": 1e-4, "f16": 7e-3, "bf16": 5e-2, "q8_0": 0.3, "q6_k": 0.75, "q5_k_m": 1.25, "q4_k_m": 2.75}
# Mean abs difference (a steadier figure than the max), measured then with headroom.
MEAN_TOLERANCE = {"f32": 1e-5, "f16": 1.2e-3, "bf16": 1e-2, "q8_0": 0.05, "q6_k": 0.13, "q5_k_m": 0.2, "q4_k_m": 0.4}


@pytest.fixture(scope="module")
def qwen_bf16(tmp_path_factory, vocab_dir) -> Path:
    """bf16, tied output, sharded with an index, template in chat_template.jinja (like the real one)."""
    return make_tiny_qwen3(tmp_path_factory.mktemp("qwen_bf16"), vocab_dir)


@pytest.fixture(scope="module")
def qwen_f32_untied(tmp_path_factory, vocab_dir) -> Path:
    """f32, untied output, one safetensors file, template inside tokenizer_config.json."""
    return make_tiny_qwen3(tmp_path_factory.mktemp("qwen_f32"), vocab_dir, n_layer=2, seed=1, dtype="float32",
                           tie_word_embeddings=False, template_in_jinja_file=False, max_shard_size="10GB")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, qwen_bf16):
    """type -> GGUF of the bf16 fixture, converted on first use."""
    from paw_lite.convert.qwen3 import convert_qwen3

    out_dir = tmp_path_factory.mktemp("qwen_gguf")
    cache: dict[str, Path] = {}

    def get(qtype: str) -> Path:
        if qtype not in cache:
            cache[qtype] = convert_qwen3(qwen_bf16, out_dir / f"tiny-{qtype}.gguf", qtype)
        return cache[qtype]

    return get


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    return [int(t) for t in sample_ids(26, seed=3)] + [IM_START_ID, IM_END_ID, FIRST_PREFIX_ID, N_VOCAB - 1, ENDOFTEXT_ID, 1000]


def hf_hidden(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].numpy()


def llama_hidden(path: Path, ids: list[int]) -> np.ndarray:
    """Final-layer hidden states of every position through llama.cpp's low-level API."""
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    assert model, f"llama.cpp could not load {path}"
    n = len(ids)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(64, n)
    cp.n_threads = cp.n_threads_batch = 2
    cp.embeddings = True
    cp.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
    cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F32
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, cp)
    try:
        tokens = (llama_cpp.llama_token * n)(*ids)
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, n)) == 0
        d = llama_cpp.llama_model_n_embd(model)
        return np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(ctx, i), shape=(d,)).copy() for i in range(n)])
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


@pytest.fixture(scope="module")
def reference(qwen_bf16, prompt_ids) -> np.ndarray:
    return hf_hidden(qwen_bf16, prompt_ids)


@pytest.mark.parametrize("qtype", list(TOLERANCE))
def test_hidden_states_match_transformers(converted, reference, prompt_ids, qtype):
    got = llama_hidden(converted(qtype), prompt_ids)
    diff = np.abs(got - reference)
    print(f"{qtype}: max abs {diff.max():.3g}, mean abs {diff.mean():.3g}")
    assert diff.max() <= TOLERANCE[qtype] and diff.mean() <= MEAN_TOLERANCE[qtype], (diff.max(), diff.mean())


def test_untied_f32_source_matches_transformers(tmp_path, qwen_f32_untied, prompt_ids):
    from paw_lite.convert.qwen3 import convert_qwen3
    from paw_lite.convert.verify import verify_gguf

    out = convert_qwen3(qwen_f32_untied, tmp_path / "untied.gguf", "f32")
    info = verify_gguf(out, "compiler")
    assert not info["tied_output"]
    got, ref = llama_hidden(out, prompt_ids), hf_hidden(qwen_f32_untied, prompt_ids)
    assert np.abs(got - ref).max() <= 1e-4


def test_file_types_and_tensor_types(converted):
    from paw_lite.convert.gguf_meta import read_gguf_meta

    expect = {"f32": {"F32"}, "f16": {"F16", "F32"}, "bf16": {"BF16", "F32"}, "q8_0": {"Q8_0", "F32"},
              "q4_k_m": {"Q4_K", "Q6_K", "F32"}, "q5_k_m": {"Q5_K", "Q6_K", "F32"}, "q6_k": {"Q6_K", "F32"}}
    file_types = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
    for qtype, kinds in expect.items():
        meta = read_gguf_meta(converted(qtype))
        assert {t.qtype.name for t in meta.tensors.values()} == kinds, qtype
        assert meta.fields["general.file_type"] == file_types[qtype]
        # norms stay F32 whatever the type
        assert all(t.qtype.name == "F32" for n, t in meta.tensors.items() if "norm" in n)


def test_bf16_weights_are_bit_identical(converted, qwen_bf16):
    from paw_lite.convert.gguf_meta import read_gguf_meta
    from paw_lite.safetensors_file import SafetensorsFile

    meta = read_gguf_meta(converted("bf16"))
    entry = meta.tensors["blk.1.ffn_down.weight"]
    got = np.memmap(meta.path, dtype="<u2", mode="r", offset=entry.offset, shape=entry.shape)
    index = json.loads((qwen_bf16 / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.down_proj.weight"
    assert np.array_equal(got, SafetensorsFile(qwen_bf16 / index[key]).raw(key))


def test_metadata(converted, qwen_bf16):
    from gguf import TokenType

    from paw_lite.convert.gguf_meta import read_gguf_meta

    f = read_gguf_meta(converted("q8_0")).fields
    cfg = json.loads((qwen_bf16 / "config.json").read_text())
    assert f["general.architecture"] == "qwen3"
    assert f["qwen3.block_count"] == cfg["num_hidden_layers"] == 4
    assert f["qwen3.embedding_length"] == 256 and f["qwen3.feed_forward_length"] == 512
    assert f["qwen3.attention.head_count"] == 4 and f["qwen3.attention.head_count_kv"] == 2
    assert f["qwen3.attention.key_length"] == f["qwen3.attention.value_length"] == 128  # != 256 / 4
    assert f["qwen3.context_length"] == 2048
    assert f["qwen3.rope.freq_base"] == 5000000.0  # from transformers-5 rope_parameters
    assert abs(f["qwen3.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == N_VOCAB
    assert tokens[FIRST_PREFIX_ID:] == PREFIX_TOKENS
    assert all(types[i] == TokenType.CONTROL for i in range(FIRST_PREFIX_ID, N_VOCAB))
    assert all(types[i] == TokenType.CONTROL for i in (ENDOFTEXT_ID, IM_START_ID, IM_END_ID))
    assert types[tokens.index("<think>")] == TokenType.USER_DEFINED  # added but not special in Qwen3
    assert types[1000] == TokenType.NORMAL
    assert len(f["tokenizer.ggml.merges"]) == 151387
    assert f["tokenizer.ggml.eos_token_id"] == IM_END_ID and f["tokenizer.ggml.padding_token_id"] == ENDOFTEXT_ID
    assert f["tokenizer.ggml.bos_token_id"] == ENDOFTEXT_ID and f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_chat_template_from_tokenizer_config(qwen_f32_untied, tmp_path):
    from paw_lite.convert.hf_bpe import read_bpe_vocab

    assert not (qwen_f32_untied / "chat_template.jinja").exists()
    assert read_bpe_vocab(qwen_f32_untied, N_VOCAB).chat_template == CHAT_TEMPLATE


def test_tokenization_matches_hf(converted, qwen_bf16, vocab_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(qwen_bf16)
    llm = llama_cpp.Llama(str(converted("q4_k_m")), vocab_only=True, verbose=False)
    cases = reference_cases(vocab_dir)
    assert len(cases) > 40
    for text, ids in cases:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert hf.encode(text, add_special_tokens=False) == ids, text
    # The compiler's encoder input: chat markup, a pseudo-program, <|im_end|>, the 64 prefix tokens.
    text = (hf.apply_chat_template([{"role": "user", "content": "Sort words: <prefix_7> ünïcode 123"}], tokenize=False,
                                   add_generation_prompt=True)
            + "[PSEUDO_PROGRAM]\nTask: sort\n[END_PSEUDO_PROGRAM]<|im_end|>" + "".join(PREFIX_TOKENS) + "<think>ok</think>")
    want = hf.encode(text, add_special_tokens=False)
    assert list(range(FIRST_PREFIX_ID, N_VOCAB)) == want[want.index(FIRST_PREFIX_ID):want.index(FIRST_PREFIX_ID) + 64]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == want
    # as CONTROL tokens they are plain text when special tokens are not parsed
    assert FIRST_PREFIX_ID not in llm.tokenize(b"<prefix_1>", add_bos=False, special=False)


def test_legacy_rope_theta_config(tmp_path, qwen_bf16):
    """transformers-4 style: rope_theta at top level, no rope_parameters."""
    from paw_lite.convert.qwen3 import Qwen3Config

    cfg = json.loads((qwen_bf16 / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["rope_scaling"] = 1234567.0, None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert Qwen3Config.from_hf(tmp_path / "config.json").rope_theta == 1234567.0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _expect_failure(folder: Path, out: Path, exc: type, match: str, qtype: str = "f16") -> None:
    from paw_lite.convert.qwen3 import convert_qwen3

    with pytest.raises(exc, match=match):
        convert_qwen3(folder, out, qtype)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temporary files left behind"


def test_bad_inputs_fail_cleanly(tmp_path, qwen_bf16):
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    _expect_failure(tmp_path / "nope", out, ModelNotFoundError, "not a folder")

    d = _copy(qwen_bf16, tmp_path / "rope")
    _edit_json(d / "config.json", rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    _expect_failure(d, out, IncompatibleModelError, "rope type 'yarn'")

    _edit_json(d / "config.json", rope_parameters={"rope_type": "default", "rope_theta": 1e6}, model_type="llama")
    _expect_failure(d, out, IncompatibleModelError, "model_type is 'llama'")

    _edit_json(d / "config.json", model_type="qwen3", intermediate_size=768)
    _expect_failure(d, out, InvalidFileError, r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\), expected .* from config.json")

    _edit_json(d / "config.json", intermediate_size=512, tie_word_embeddings=False)
    _expect_failure(d, out, InvalidFileError, "no lm_head.weight")

    _edit_json(d / "config.json", tie_word_embeddings=True)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _expect_failure(d, out, ModelNotFoundError, "missing .incomplete download")

    _expect_failure(qwen_bf16, out, InvalidFileError, "Qwen3 converts to one of", qtype="q4_0")


def test_an_index_whose_weight_map_is_not_an_object_is_refused(tmp_path, qwen_bf16):
    """Checked with a real error, not an assert (gone under python -O, leaving an AttributeError)."""
    d = _copy(qwen_bf16, tmp_path / "index")
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}), encoding="utf-8")
    _expect_failure(d, tmp_path / "x.gguf", InvalidFileError, "weight_map is a JSON list, expected an object")


def test_truncated_shard_and_tokenizer_refused(tmp_path, qwen_bf16):
    out = tmp_path / "x.gguf"
    d = _copy(qwen_bf16, tmp_path / "trunc")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _expect_failure(d, out, InvalidFileError, "inconsistent with the file")

    d = _copy(qwen_bf16, tmp_path / "tok")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    (d / "tokenizer.json").write_text(json.dumps(tj))
    _expect_failure(d, out, IncompatibleModelError, "pre-tokenizer is not Qwen2's")


def test_a_tokenizer_without_the_chat_tokens_is_refused_before_anything_is_written(tmp_path, qwen_bf16, monkeypatch):
    """Checked from tokenizer.json up front: a K-quant of a 4B model writes an 8 GB intermediate
    and quantizes it before the output could be verified."""
    import paw_lite.convert.qwen3 as qwen3

    d = _copy(qwen_bf16, tmp_path / "chat")
    tj = json.loads((d / "tokenizer.json").read_text())
    for added in tj["added_tokens"]:
        if added["content"] == "<|im_start|>":
            added["special"] = False  # a plain added token, not CONTROL
    (d / "tokenizer.json").write_text(json.dumps(tj))
    written = []
    monkeypatch.setattr(qwen3, "write_streamed", lambda *args, **kwargs: written.append(args))
    _expect_failure(d, tmp_path / "x.gguf", InvalidFileError, r"tokenizer\.json: chat token <\|im_start\|> is missing or not a "
                    r"CONTROL token", qtype="q4_k_m")
    assert written == []


def test_tied_lm_head_must_equal_embedding(tmp_path, qwen_f32_untied):
    """A folder saying tie_word_embeddings with a different lm_head would silently change the model."""
    d = _copy(qwen_f32_untied, tmp_path / "tied")
    _edit_json(d / "config.json", tie_word_embeddings=True)
    _expect_failure(d, tmp_path / "x.gguf", InvalidFileError, "differs from model.embed_tokens.weight")


def test_nan_and_f16_overflow_refused(tmp_path, qwen_f32_untied):
    from safetensors.numpy import load_file, save_file

    d = _copy(qwen_f32_untied, tmp_path / "nan")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = 1e6
    save_file(tensors, d / "model.safetensors")
    _expect_failure(d, tmp_path / "x.gguf", InvalidFileError, "exceed the float16 range", qtype="f16")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, d / "model.safetensors")
    _expect_failure(d, tmp_path / "x.gguf", InvalidFileError, "NaN or Inf", qtype="q8_0")


def test_verify_refuses_stock_qwen_as_trained_compiler(tmp_path, qwen_f32_untied):
    """Without the <prefix_k> tokens a Qwen3 GGUF serves as the pseudo compiler only."""
    from paw_lite.convert.qwen3 import convert_qwen3
    from paw_lite.convert.verify import verify_gguf

    d = _copy(qwen_f32_untied, tmp_path / "stock")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["added_tokens"] = [a for a in tj["added_tokens"] if not a["content"].startswith("<prefix_")]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("extra_special_tokens", None)
    tc.pop("additional_special_tokens", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    out = convert_qwen3(d, tmp_path / "stock.gguf", "q8_0")
    info = verify_gguf(out, "pseudo_compiler")
    assert info["chat_template"] and info["n_vocab"] == N_VOCAB  # the 64 rows become [PAD] tokens
    with pytest.raises(IncompatibleModelError, match="missing .'<prefix_1>'"):
        verify_gguf(out, "compiler")


def test_cli(tmp_path, qwen_bf16):
    import subprocess
    import sys

    out = tmp_path / "compiler.gguf"
    r = subprocess.run([sys.executable, "-m", "paw_lite", "convert", "qwen3", str(qwen_bf16), "-o", str(out), "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    # the trained compiler (it has the <prefix_k> tokens) defaults to Q8_0, and is verified as such
    assert info["type"] == "q8_0" and info["role"] == "compiler" and info["prefix_ids"] == [FIRST_PREFIX_ID, N_VOCAB - 1]
    assert info["n_files"] == 2 and info["bytes"] == out.stat().st_size and info["tensor_types"] == {"Q8_0": 29, "F32": 17}

    bad = _copy(qwen_bf16, tmp_path / "bad")
    _edit_json(bad / "config.json", num_hidden_layers=5)
    out2 = tmp_path / "bad.gguf"
    r = subprocess.run([sys.executable, "-m", "paw_lite", "convert", "qwen3", str(bad), "-o", str(out2), "--type", "q4_k_m"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "missing tensors" in r.stderr
    assert not out2.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".bad.gguf")] == []


def test_nan_in_a_bf16_source_is_refused_when_copied_as_bf16(tmp_path, qwen_bf16):
    """bf16 to bf16 copies the bits; it used to copy a NaN as well, which f16 and q8_0 refuse."""
    torch = oracle("torch")
    from safetensors.torch import load_file, save_file

    d = _copy(qwen_bf16, tmp_path / "nan")
    shard = next(p for p in sorted(d.glob("*.safetensors")))
    tensors = load_file(str(shard))
    name = next(k for k, t in tensors.items() if t.dtype == torch.bfloat16 and t.ndim == 2)
    tensors[name][1, 2] = float("nan")
    save_file(tensors, str(shard))
    _expect_failure(d, tmp_path / "x.gguf", InvalidFileError, "NaN or Inf", qtype="bf16")


def test_k_quant_reports_each_tensor_as_llama_cpp_quantizes_it(tmp_path, qwen_bf16, monkeypatch):
    """The quantizer runs in a child process; its per-tensor log lines reach the parent as progress
    (without them a 4B model showed a finished bar for minutes). A module in the working folder
    does not shadow the child's imports (as it would with `python -m`)."""
    from paw_lite.convert.gguf_meta import read_gguf_meta
    from paw_lite.convert.qwen3 import convert_qwen3

    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "gguf.py").write_text("raise ImportError('the working folder shadowed gguf')\n")
    monkeypatch.chdir(tmp_path / "cwd")

    written, passes = [], []
    out = convert_qwen3(qwen_bf16, tmp_path / "q.gguf", "q6_k", written.append,
                        lambda count: passes.append((count, len(written))))
    names = set(read_gguf_meta(out).tensors)
    # the intermediate's tensors as written, then the quantize pass announced and its tensors again
    assert passes == [(len(names), len(names))]
    assert len(written) == 2 * len(names) and set(written[len(names):]) == names


def test_on_a_terminal_a_k_quant_conversion_shows_both_passes(tmp_path, qwen_bf16, monkeypatch):
    """The bar names the shard each tensor is read from, then restarts for llama.cpp's quantizer
    (stderr claims to be a terminal, so the bar draws)."""
    import io
    import sys

    from paw_lite.cli import main

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["convert", "qwen3", str(qwen_bf16), "-o", str(tmp_path / "q.gguf"), "--type", "q6_k"]) == 0
    reading, _, quantizing = err.getvalue().partition("llama.cpp quantize to Q6_K")
    assert "model-00001-of-00002.safetensors: " in reading and quantizing
    assert ".safetensors" not in quantizing  # the quantizer reads the intermediate file, not a shard


def test_an_interrupted_k_quant_kills_the_quantizer_and_leaves_nothing(tmp_path, qwen_bf16, monkeypatch):
    """A KeyboardInterrupt in the parent (here raised from the progress callback, where a Ctrl-C
    lands while the parent waits on the child) kills the quantizer at once: no output, no
    intermediate, no temporary file, no process left running."""
    import subprocess

    from paw_lite.convert import llama_quantize
    from paw_lite.convert.qwen3 import convert_qwen3

    children = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            children.append(self)

    monkeypatch.setattr(llama_quantize.subprocess, "Popen", Recorded)

    def interrupt(count: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_qwen3(qwen_bf16, tmp_path / "q.gguf", "q4_k_m", on_pass=interrupt)
    assert len(children) == 1 and children[0].returncode is not None and children[0].returncode < 0  # killed
    assert list(tmp_path.iterdir()) == []


def test_a_quantizer_failure_is_one_error_naming_the_file(tmp_path):
    from paw_lite.convert.llama_quantize import llama_quantize

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(InvalidFileError, match=r"bad\.gguf: llama\.cpp could not quantize it to Q4_K_M: ") as err:
        llama_quantize(bad, tmp_path / "out.gguf", "q4_k_m")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_the_quantizer_child_ends_when_its_parent_is_gone(tmp_path):
    """A killed parent skips its cleanup; the child, reading its stdin to the end, exits once the
    parent's end closes instead of quantizing on for minutes into a file nobody renames."""
    import subprocess
    import sys
    import time

    from paw_lite.convert import llama_quantize

    fifo = tmp_path / "source.gguf"
    os.mkfifo(fifo)  # llama.cpp blocks opening it: a quantization that is still running
    child = subprocess.Popen([sys.executable, "-c", llama_quantize._CHILD, str(fifo), str(tmp_path / "o.gguf"), "q4_k_m", "1"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(3)
        assert child.poll() is None
        child.stdin.close()  # what the parent's death does to the pipe
        assert child.wait(timeout=30) == 1
    finally:
        child.kill()
        child.wait()
