"""Shared fixtures: real tokenizer data from the llama-cpp-python source distribution, and tiny
deterministic random GPT-2 models built with transformers (the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from paw_lite.testing.vocab import gpt2_vocab as _read_gpt2_vocab, vocab_dir as _vocab_dir

pytest_plugins = ("oracles",)  # the import policy for oracles; a skip fails the run under CI
# (imported by name below, after pytest has registered it: importing it first would keep pytest from
# rewriting its asserts)


@pytest.fixture
def python_ctrl_c():
    """Python's own SIGINT handler, as in a terminal: a runner started in the background (nohup,
    `cmd &` without job control) inherits SIGINT ignored, and `interrupts.deferred` leaves such a
    setup alone."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """llama.cpp's real GPT-2 and Qwen2 vocabularies with their reference tokenization cases."""
    return _vocab_dir()


@pytest.fixture(scope="session")
def gpt2_vocab(vocab_dir):
    """(tokens, merges, special ids, eos) of the real GPT-2 vocabulary."""
    return _read_gpt2_vocab(vocab_dir)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, gpt2_vocab) -> Path:
    """vocab.json + merges.txt of the real GPT-2 vocabulary, as HF ships them."""
    tokens, merges, _, _ = gpt2_vocab
    d = tmp_path_factory.mktemp("hf_tok")
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return d


def make_hf_gpt2(folder: Path, hf_tokenizer_dir: Path, *, n_layer=2, n_embd=64, n_head=4, n_ctx=128,
                 seed=0, init_std=0.2) -> Path:
    """A deterministic random GPT-2 saved as an HF folder (safetensors + tokenizer files)."""
    import shutil

    from oracles import oracle

    torch = oracle("torch")
    GPT2Config, GPT2LMHeadModel = oracle("transformers").GPT2Config, oracle("transformers").GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50257, n_positions=n_ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     initializer_range=init_std, bos_token_id=50256, eos_token_id=50256)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases so every parameter is exercised
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(hf_tokenizer_dir / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, hf_tokenizer_dir) -> Path:
    return make_hf_gpt2(tmp_path_factory.mktemp("tiny_hf"), hf_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_hf) -> Path:
    from paw_lite.convert.gpt2 import convert_hf_gpt2

    return convert_hf_gpt2(tiny_hf, tmp_path_factory.mktemp("tiny_gguf") / "tiny-f32.gguf", "f32")


def random_lora(n_layer: int, n_embd: int, rank: int, seed: int = 1, std: float = 0.3) -> dict[str, np.ndarray]:
    """GGUF-named LoRA tensors for every target module of a GPT-2 of this size."""
    from paw_lite.gpt2_layout import GPT2Config, LORA_MODULES

    cfg = GPT2Config(n_vocab=1, n_ctx=1, n_embd=n_embd, n_head=1, n_layer=n_layer, n_ff=4 * n_embd, eps=1e-5)
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_layer):
        for module in LORA_MODULES:
            d_in, d_out = cfg.module_dims(module)
            out[f"blk.{i}.{module}.weight.lora_a"] = (rng.standard_normal((rank, d_in)) * std).astype(np.float32)
            out[f"blk.{i}.{module}.weight.lora_b"] = (rng.standard_normal((d_out, rank)) * std).astype(np.float32)
    return out


TEMPLATE = "[PSEUDO_PROGRAM]\nTask: classify a log line as ALERT or QUIET.\n[END_PSEUDO_PROGRAM]\n\n[INPUT]\n{INPUT_PLACEHOLDER}\n[END_INPUT]"


def make_program(path: Path, tensors: dict[str, np.ndarray], alpha: float, tensor_type: str = "f32",
                 template: str = TEMPLATE, runtime_id: str = "gpt2-q8_0") -> Path:
    """A .paw bundle holding these LoRA tensors."""
    from paw_lite.lora import write_adapter_gguf
    from paw_lite.program import Program

    adapter_path = path.with_suffix(".adapter.gguf")
    write_adapter_gguf(adapter_path, tensors, alpha, tensor_type)
    adapter = adapter_path.read_bytes()
    adapter_path.unlink()
    rank = next(iter(tensors.values())).shape[0]
    meta = {"version": 4, "program_id": "0" * 20, "spec": "classify a log line as ALERT or QUIET", "interpreter": "gpt2",
            "runtime_id": runtime_id, "lora_rank": rank, "lora_alpha": alpha, "pseudo_program_strategy": "provided"}
    pseudo = template.split("\n\n[INPUT]")[0]
    return Program(meta=meta, template=template, adapter_gguf=adapter, pseudo_program=pseudo).save(path)


@pytest.fixture(scope="session")
def tiny_lora():
    return random_lora(2, 64, 32)


@pytest.fixture(scope="session")
def tiny_program(tmp_path_factory, tiny_lora) -> Path:
    return make_program(tmp_path_factory.mktemp("prog") / "tiny.paw", tiny_lora, 16.0, "f32")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def hf_greedy(model, prompt_ids: list[int], max_new: int) -> list[int]:
    """transformers' greedy generate (the oracle), without the prompt and the EOS."""
    from oracles import oracle

    torch = oracle("torch")

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=50256, pad_token_id=50256)
    ids = out[0, len(prompt_ids):].tolist()
    return ids[:ids.index(50256)] if 50256 in ids else ids
