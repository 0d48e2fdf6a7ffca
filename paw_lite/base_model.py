"""Loading the GPT-2 interpreter: a GGUF file (the official layout) or an HF GPT-2 folder."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import IncompatibleModelError, InvalidFileError, ModelNotFoundError, malformed_file
from .gguf_file import (WEIGHT_TYPES, TensorInfo, get_field, get_float, get_int, get_str, iter_tensors, numpy_shape, read_index,
                        tensor_to_f32)
from .gpt2_layout import ARCH, GPT2Config
from .hf_gpt2 import INTERPRETER_SOURCES, hf_gpt2_config, hf_gpt2_tensors
from .tokenizer import GPT2Tokenizer


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class BaseModel:
    """A GPT-2 interpreter in memory: float32 weights under GGUF names, its tokenizer, and a content
    fingerprint that keys the prefix caches built on it."""

    config: GPT2Config
    weights: dict[str, np.ndarray] = field(repr=False)
    tokenizer: GPT2Tokenizer = field(repr=False)
    source: Path
    fingerprint: str

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "BaseModel":
        """Load a GPT-2 GGUF file or HF folder. One BaseModel can serve several functions
        (`paw_lite.function(..., base_model=base)`): that saves its load and its embeddings, but each
        function still holds its own LoRA-merged copy of the block matrices."""
        path = Path(path).expanduser()
        if path.is_dir():
            with malformed_file(path, "HF GPT-2 folder"):
                return _load_hf_dir(path)
        if not path.exists():
            raise ModelNotFoundError(f"{path}: no such interpreter model (a GGUF file or an HF GPT-2 folder)")
        with malformed_file(path, "GPT-2 GGUF"):
            return _load_gguf(path)


def _check_shapes(weights: dict[str, np.ndarray], config: GPT2Config, source: Path) -> None:
    expected = config.tensor_shapes()
    if "output.weight" in weights:
        expected["output.weight"] = (config.n_vocab, config.n_embd)
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise InvalidFileError(f"{source}: unexpected tensors for a GPT-2 model: {', '.join(unknown[:5])}")
    for name, shape in expected.items():
        if name not in weights:
            raise InvalidFileError(f"{source}: tensor {name} is missing")
        if tuple(weights[name].shape) != shape:
            raise InvalidFileError(f"{source}: {name} has shape {tuple(weights[name].shape)}, expected {shape}")


def read_header(path: str | os.PathLike[str]) -> tuple[GPT2Config, GPT2Tokenizer]:
    """Config and tokenizer of an interpreter (GGUF file or HF folder), checked, without loading its weights."""
    path = Path(path)
    if path.is_dir():
        config = hf_gpt2_config(path / "config.json", INTERPRETER_SOURCES)
        return config, GPT2Tokenizer.from_hf_dir(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such interpreter model (a GGUF file or an HF GPT-2 folder)")
    _, config, tokenizer = _gguf_header(path)
    return config, tokenizer


def _gguf_header(path: Path):
    reader, config = _gguf_config(path)
    return reader, config, _gguf_tokenizer(reader, config, path)


def _gguf_config(path: Path):
    """The index and the checked hyperparameters and tensor shapes of an interpreter GGUF."""
    reader = read_index(path)  # gguf-py's GGUFReader takes ~2 s over a 50k-token vocabulary; this ~0.1 s
    # A program's adapter.gguf names the interpreter's architecture ('gpt2') too: without this check
    # it passed the one below and failed on a hyperparameter only a model has.
    if (get_field(reader, "adapter.type", path, None) == "lora"
            or get_field(reader, "general.type", path, None) == "adapter"):
        raise IncompatibleModelError(f"{path}: is a LoRA adapter, not a base model; pass the interpreter GGUF "
                                     f"(gpt2-q8_0.gguf) instead")
    arch = get_str(reader, "general.architecture", path)
    if arch != ARCH:
        raise IncompatibleModelError(f"{path}: architecture is {arch!r}; the interpreter runs GPT-2 ('gpt2') models")
    n_embd = get_int(reader, f"{arch}.embedding_length", path)
    tokens = get_field(reader, "tokenizer.ggml.tokens", path)
    if not isinstance(tokens, list):
        raise InvalidFileError(f"{path}: tokenizer.ggml.tokens is not a list of strings")
    config = GPT2Config(
        n_vocab=len(tokens),
        n_ctx=get_int(reader, f"{arch}.context_length", path),
        n_embd=n_embd,
        n_head=get_int(reader, f"{arch}.attention.head_count", path),
        n_layer=get_int(reader, f"{arch}.block_count", path),
        n_ff=get_int(reader, f"{arch}.feed_forward_length", path, default=4 * n_embd),
        eps=get_float(reader, f"{arch}.attention.layer_norm_epsilon", path),
    ).validate(path)
    infos = {t.name: t for t in reader.tensors}
    # Check every shape from the header before dequantizing anything.
    _check_shapes({n: _ShapeOnly(numpy_shape(t)) for n, t in infos.items()}, config, path)
    return reader, config


def _gguf_tokenizer(reader, config: GPT2Config, path: Path) -> GPT2Tokenizer:
    tokenizer = GPT2Tokenizer.from_gguf(reader, path)
    if tokenizer.n_vocab != config.n_vocab:  # both come from tokenizer.ggml.tokens, read by two readers
        raise InvalidFileError(f"{path}: the tokenizer has {tokenizer.n_vocab} tokens but tokenizer.ggml.tokens "
                               f"lists {config.n_vocab}; re-convert the model with `paw-lite convert gpt2`")
    return tokenizer


def _load_gguf(path: Path) -> BaseModel:
    index, config = _gguf_config(path)
    # Jobs at once: NumPy dequantizes (two halves of the tensors) and hashlib hashes with the GIL
    # released, while the tokenizer is built in Python here. The fingerprint is the sha256 of the
    # whole file: it costs little wall time next to dequantizing (a second read comes from the page
    # cache), so nothing weaker is used.
    in_file_order = sorted(index.tensors, key=lambda t: t.data_offset)
    with ThreadPoolExecutor(max_workers=3) as pool:
        digest = pool.submit(file_sha256, path)
        halves = [pool.submit(_read_tensors, index, path, part) for part in _halves_by_size(in_file_order)]
        tokenizer = _gguf_tokenizer(index, config, path)
        loaded = {name: array for half in halves for name, array in half.result().items()}
        fingerprint = digest.result()
    weights = {t.name: loaded[t.name] for t in in_file_order}
    return BaseModel(config, weights, tokenizer, path, fingerprint)


def _halves_by_size(tensors: list[TensorInfo]) -> list[list[TensorInfo]]:
    """Two groups of about the same number of bytes, largest tensors dealt first."""
    groups: list[list[TensorInfo]] = [[], []]
    sizes = [0, 0]
    for t in sorted(tensors, key=lambda t: t.n_bytes, reverse=True):
        smaller = sizes.index(min(sizes))
        groups[smaller].append(t)
        sizes[smaller] += t.n_bytes
    return groups


def _read_tensors(index, path: Path, tensors: list[TensorInfo]) -> dict[str, np.ndarray]:
    """float32 tensors by name, read in file order."""
    return {info.name: tensor_to_f32(info, raw, path, WEIGHT_TYPES) for info, raw in iter_tensors(index, tensors)}


class _ShapeOnly:
    """Stands in for an array in shape checks, so no tensor data is touched."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def _load_hf_dir(folder: Path) -> BaseModel:
    cfg_path = folder / "config.json"
    config = hf_gpt2_config(cfg_path, INTERPRETER_SOURCES)
    st_path = folder / "model.safetensors"
    weights = dict(hf_gpt2_tensors(folder))
    _check_shapes(weights, config, st_path)
    tokenizer = GPT2Tokenizer.from_hf_dir(folder)
    if tokenizer.n_vocab != config.n_vocab:
        raise InvalidFileError(f"{folder}: tokenizer has {tokenizer.n_vocab} tokens but config.json says vocab_size {config.n_vocab}")
    h = hashlib.sha256()
    for p in (cfg_path, st_path):
        h.update(file_sha256(p).encode())
    return BaseModel(config, weights, tokenizer, folder, h.hexdigest())
