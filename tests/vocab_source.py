"""Real GPT-2 / Qwen2 vocabularies from the llama-cpp-python source distribution, shared by the test
fixtures (conftest.py) and the benchmark (benchmarks/interpreter_bench.py). No registry package
ships GPT-2 weights, but this sdist carries llama.cpp's vocabulary files with reference cases."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_CACHE = Path(os.environ.get("PAW_LITE_TEST_CACHE", ROOT / ".test-cache"))
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
VOCAB_MEMBERS = ("ggml-vocab-gpt-2.gguf", "ggml-vocab-gpt-2.gguf.inp", "ggml-vocab-gpt-2.gguf.out",
                 "ggml-vocab-qwen2.gguf", "ggml-vocab-qwen2.gguf.inp", "ggml-vocab-qwen2.gguf.out")


def llama_sdist() -> Path:
    """The llama-cpp-python sdist: $PAW_LITE_LLAMA_SDIST, else the test cache (downloaded once with pip)."""
    env = os.environ.get("PAW_LITE_LLAMA_SDIST")
    if env:
        return Path(env)
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    path = TEST_CACHE / name
    if not path.exists():
        TEST_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(TEST_CACHE),
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], check=True)
    return path


def vocab_dir() -> Path:
    """A folder holding VOCAB_MEMBERS, extracted from the sdist once into the test cache."""
    out = TEST_CACHE / "vocab"
    if all((out / m).exists() for m in VOCAB_MEMBERS):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(llama_sdist()) as tf:
        for member in tf.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if base in VOCAB_MEMBERS and "/vendor/llama.cpp/models/" in member.name:
                (out / base).write_bytes(tf.extractfile(member).read())
    missing = [m for m in VOCAB_MEMBERS if not (out / m).exists()]
    if missing:
        raise RuntimeError(f"{llama_sdist()}: the sdist lacks {missing}")
    return out


def gpt2_vocab(folder: Path) -> tuple[list[str], list[str], list[int], int]:
    """(tokens, merges, special ids, eos id) of the real GPT-2 vocabulary in `folder`."""
    from gguf import GGUFReader, TokenType

    r = GGUFReader(folder / "ggml-vocab-gpt-2.gguf")
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    special = [i for i, t in enumerate(types) if t == TokenType.CONTROL]
    return tokens, merges, special, int(r.fields["tokenizer.ggml.eos_token_id"].contents())
