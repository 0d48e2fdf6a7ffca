"""Real GPT-2 / Qwen2 vocabularies from the llama-cpp-python source distribution, shared by the test
fixtures (conftest.py) and the benchmark (benchmarks/interpreter_bench.py). No registry package
ships GPT-2 weights, but this sdist carries llama.cpp's vocabulary files with reference cases."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source checkout: this module serves its tests and benchmarks
TEST_CACHE = Path(os.environ.get("PAW_LITE_TEST_CACHE", ROOT / ".test-cache"))
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
VOCAB_MEMBERS = ("ggml-vocab-gpt-2.gguf", "ggml-vocab-gpt-2.gguf.inp", "ggml-vocab-gpt-2.gguf.out",
                 "ggml-vocab-qwen2.gguf", "ggml-vocab-qwen2.gguf.inp", "ggml-vocab-qwen2.gguf.out")
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"


class SdistError(RuntimeError):
    """The llama-cpp-python sdist could not be downloaded or read. A RuntimeError, as this module's
    errors have always been; `paw-lite bench` reports it as its one-line error."""


def _offline_hint() -> str:
    return (f"set PAW_LITE_LLAMA_SDIST to a local copy of {SDIST_NAME} "
            f"(pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}), "
            f"or run once with network access")


def llama_sdist() -> Path:
    """The llama-cpp-python sdist: $PAW_LITE_LLAMA_SDIST, else the test cache (downloaded once with pip)."""
    env = os.environ.get("PAW_LITE_LLAMA_SDIST")
    if env:
        return Path(env)
    path = TEST_CACHE / SDIST_NAME
    if not path.exists():
        TEST_CACHE.mkdir(parents=True, exist_ok=True)
        print(f"downloading {SDIST_NAME} (llama.cpp's vocabularies) into {TEST_CACHE} with pip ...", file=sys.stderr)
        # pip's chatter is captured: on stdout it would corrupt `paw-lite bench --json`.
        try:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                                   "--no-binary", ":all:", "-d", str(TEST_CACHE),
                                   f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
        except OSError as exc:
            raise SdistError(f"{path}: could not run pip to download it ({exc}); {_offline_hint()}") from None
        if done.returncode != 0:
            output = done.stderr or done.stdout
            log = TEST_CACHE / "pip-download.log"
            log.write_text(output, encoding="utf-8")
            lines = [line.strip() for line in output.splitlines() if line.strip()]
            # pip's last line is often a hint ("See above for details"); its ERROR line says what failed
            said = next((line for line in reversed(lines) if line.startswith("ERROR:")), lines[-1] if lines else
                        f"exit status {done.returncode}")
            raise SdistError(f"{path}: pip download failed ({said}; pip's output is in {log}); {_offline_hint()}")
        if not path.exists():
            raise SdistError(f"{path}: pip download succeeded but did not write this file; {_offline_hint()}")
    return path


def _sdist_vocab(sdist: Path) -> dict[str, bytes]:
    """The VOCAB_MEMBERS found in the sdist, by base name."""
    found = {}
    try:
        with tarfile.open(sdist) as tf:
            for member in tf:
                base = member.name.rsplit("/", 1)[-1]
                if base in VOCAB_MEMBERS and "/vendor/llama.cpp/models/" in member.name and member.isfile():
                    found[base] = tf.extractfile(member).read()
    # A truncated gzip stream surfaces as EOFError or zlib.error, not only as a TarError.
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        # tarfile's ReadError lists every method it tried, one per line: the first line says enough.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc).splitlines() or [""])[0].rstrip(":")
        fix = _offline_hint() if os.environ.get("PAW_LITE_LLAMA_SDIST") else f"delete it and {_offline_hint()}"
        raise SdistError(f"{sdist}: not a readable llama-cpp-python sdist ({type(exc).__name__}: {reason}); {fix}") from None
    missing = [m for m in VOCAB_MEMBERS if m not in found]
    if missing:
        raise SdistError(f"{sdist}: the sdist lacks {missing}; it should be llama-cpp-python "
                         f"{LLAMA_CPP_PYTHON_VERSION}: {_offline_hint()}")
    return found


def vocab_dir() -> Path:
    """A folder holding VOCAB_MEMBERS, extracted from the sdist once into the test cache."""
    out = TEST_CACHE / "vocab"
    if all((out / m).exists() for m in VOCAB_MEMBERS):
        return out
    found = _sdist_vocab(llama_sdist())
    out.mkdir(parents=True, exist_ok=True)
    for base, data in found.items():
        (out / base).write_bytes(data)
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
