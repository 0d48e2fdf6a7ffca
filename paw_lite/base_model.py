"""Loading the GPT-2 interpreter: a GGUF file (the official layout) or an HF GPT-2 folder."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from .errors import IncompatibleModelError, InvalidFileError, ModelNotFoundError, malformed_file
from .gguf_fast import TensorInfo, dequantize, iter_tensors, read_index
from .gguf_file import WEIGHT_TYPES, get_field, get_float, get_int, get_str, numpy_shape
from .gpt2_layout import ARCH, GPT2Config, hf_to_gguf_name
from .safetensors_file import SafetensorsFile
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
    assert tokenizer.n_vocab == config.n_vocab  # both are the length of tokenizer.ggml.tokens
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
    return {info.name: _tensor_f32(info, raw, path) for info, raw in iter_tensors(index, tensors)}


def _tensor_f32(info: TensorInfo, raw: bytes, path: Path) -> np.ndarray:
    if info.tensor_type not in WEIGHT_TYPES:
        names = ", ".join(sorted(t.name for t in WEIGHT_TYPES))
        raise InvalidFileError(f"{path}: tensor {info.name} has type {info.tensor_type.name}; supported here: {names}")
    out = dequantize(raw, info.tensor_type, numpy_shape(info))
    # Q8_0 values are int8 times a float16 scale: finite exactly when every scale is.
    finite = _q8_0_scales(raw) if info.tensor_type == GGMLQuantizationType.Q8_0 else out
    if not np.isfinite(finite).all():
        raise InvalidFileError(f"{path}: tensor {info.name} holds NaN or Inf values")
    return out


def _q8_0_scales(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, np.uint8).reshape(-1, 34)[:, :2].copy().view("<f2")


class _ShapeOnly:
    """Stands in for an array in shape checks, so no tensor data is touched."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# What a folder without config.json should have been, for the error: what the converter reads, and
# what runs (a GGUF, or a folder whose weights are already safetensors).
HF_GPT2_FOLDER = "an HF GPT-2 folder (config.json, model.safetensors or pytorch_model.bin, tokenizer files)"
INTERPRETER_SOURCES = "an HF GPT-2 folder (config.json, model.safetensors, tokenizer files) or a GPT-2 .gguf"


def hf_gpt2_config(cfg_path: Path, expected: str = HF_GPT2_FOLDER) -> GPT2Config:
    """GPT2Config from an HF config.json; `expected` describes the folder in the errors for a missing one."""
    folder = cfg_path.parent
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: not a folder; pass {expected}")
    if not cfg_path.exists():
        raise ModelNotFoundError(f"{folder}: no config.json; pass {expected}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except OSError as exc:  # strerror: str(exc) would repeat the path
        raise InvalidFileError(f"{cfg_path}: cannot read the model config: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidFileError(f"{cfg_path}: cannot read the model config: {exc}") from exc
    if not isinstance(cfg, dict):
        raise InvalidFileError(f"{cfg_path}: is a JSON {type(cfg).__name__}, expected an object of hyperparameters")
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise IncompatibleModelError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, expected 'gpt2'")
    if cfg.get("activation_function", "gelu_new") not in _ACTIVATIONS:
        raise IncompatibleModelError(f"{cfg_path}: activation_function {cfg['activation_function']!r} is not GPT-2's tanh GELU")
    try:
        n_embd = int(cfg["n_embd"])
        return GPT2Config(
            n_vocab=int(cfg["vocab_size"]),
            n_ctx=int(cfg.get("n_positions", cfg.get("n_ctx"))),
            n_embd=n_embd,
            n_head=int(cfg["n_head"]),
            n_layer=int(cfg["n_layer"]),
            n_ff=int(cfg.get("n_inner") or 4 * n_embd),
            eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        ).validate(cfg_path)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidFileError(f"{cfg_path}: missing or malformed GPT-2 hyperparameter: {exc}") from exc


def hf_gpt2_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in Linear layout) for each weight of an HF GPT-2 folder, one at a
    time; an output matrix equal to the embedding is dropped (tied, as in the official layout)."""
    st_path = folder / "model.safetensors"
    if not st_path.exists():
        raise ModelNotFoundError(f"{folder}: no model.safetensors (convert a pytorch_model.bin with `paw-lite convert gpt2 {folder} -o gpt2.gguf`)")
    st = SafetensorsFile(st_path)
    for key in st.keys():
        mapped = hf_gguf_name(key, st_path)
        if mapped is None:
            continue
        name, transpose = mapped
        if name == "output.weight":
            wte = next((k for k in st.keys() if k.removeprefix("transformer.") == "wte.weight"), None)
            if wte is not None and np.array_equal(st.raw(key), st.raw(wte)):
                continue
        yield name, hf_gguf_weight(st.f32(key), transpose, key, st_path)


def hf_gguf_name(key: str, source: Path) -> tuple[str, bool] | None:
    """gpt2_layout.hf_to_gguf_name, its error naming the file the tensor came from."""
    try:
        return hf_to_gguf_name(key)
    except InvalidFileError as exc:
        raise InvalidFileError(f"{source}: {exc}") from None


def hf_gguf_weight(arr: np.ndarray, transpose: bool, key: str, source: Path) -> np.ndarray:
    """An HF GPT-2 weight (float32) as its GGUF tensor: refused if not finite (as the GGUF path
    refuses them: NaN weights give garbage, silently), transposed where HF's Conv1D layout differs."""
    if not np.isfinite(arr).all():
        raise InvalidFileError(f"{source}: tensor {key} holds NaN or Inf values")
    return np.ascontiguousarray(arr.T) if transpose else arr


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
