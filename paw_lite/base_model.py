"""Loading an interpreter: a GGUF file (the official layout) or an HF folder, of either family:
GPT-2 (Compact programs) or Qwen3 (Standard programs). The file's architecture says which
(`families.family_of_arch`); what differs between the two is the table `_KINDS` at the end."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from .engine import Engine
from .errors import IncompatibleModelError, InvalidFileError, ModelNotFoundError, PawError, malformed_file
from .families import COMPACT, FAMILIES, STANDARD, Family, family_of_arch
from .gguf_file import (WEIGHT_TYPES, GGUFIndex, TensorInfo, get_field, get_float, get_int, get_str, iter_tensors, numpy_shape,
                        read_index, tensor_to_f32)
from .gpt2_layout import GPT2Config
from .hf_gpt2 import INTERPRETER_SOURCES, hf_gpt2_config, hf_gpt2_tensors
from .qwen3_layout import Qwen3Config
from .tokenizer import BPETokenizer

ModelConfig = Union[GPT2Config, Qwen3Config]
LoraPairs = Mapping[str, tuple[np.ndarray, np.ndarray]]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class BaseModel:
    """An interpreter in memory: float32 weights under GGUF names, its tokenizer, its family and a
    content fingerprint that keys the prefix caches built on it."""

    config: ModelConfig
    weights: dict[str, np.ndarray] = field(repr=False)
    tokenizer: BPETokenizer = field(repr=False)
    source: Path
    fingerprint: str
    family: Family = COMPACT
    # Weights not read yet: `engine` reads them from `source` straight into the engine's form (once).
    unread: bool = field(default=False, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "BaseModel":
        """Load an interpreter GGUF file or HF folder (GPT-2 or Qwen3). One BaseModel can serve
        several functions (`paw_lite.function(..., base_model=base)`): that saves its load and its
        embeddings, but each function still holds its own LoRA-merged copy of the block matrices."""
        path = Path(path).expanduser()
        if path.is_dir():
            family = _hf_family(path)
            with malformed_file(path, f"HF {family.model} folder"):
                return _KINDS[family.name].load_hf(path)
        if not path.exists():
            raise ModelNotFoundError(f"{path}: no such interpreter model (a GGUF file or an HF GPT-2 or Qwen3 folder)")
        with malformed_file(path, "interpreter GGUF"):
            return _load_gguf(path)

    @classmethod
    def for_one_function(cls, path: str | os.PathLike[str]) -> "BaseModel":
        """An interpreter for one function alone (`paw_lite.function` without a loaded base): as
        `load`, except that a family whose weights can be read straight into the engine's form
        (Qwen3: `qwen3_weights.load_qwen3`, one float32 copy of the model at any time, 2.4 GB for
        Qwen3-0.6B) has them read only by `engine`, once."""
        path = Path(path).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"{path}: no such interpreter model (a GGUF file or an HF GPT-2 or Qwen3 folder)")
        if path.is_dir():
            family = _hf_family(path)
            with malformed_file(path, f"HF {family.model} folder"):
                if _KINDS[family.name].load_engine is None:
                    return _KINDS[family.name].load_hf(path)
                config, tokenizer = read_header(path)
                fingerprint = _hf_fingerprint(path, _KINDS[family.name].hf_files(path))
        else:
            with malformed_file(path, "interpreter GGUF"):
                header = index, family, config = _gguf_config(path)
                if _KINDS[family.name].load_engine is None:
                    return _load_gguf(path, header)
                with ThreadPoolExecutor(max_workers=1) as pool:
                    digest = pool.submit(file_sha256, path)
                    tokenizer = _gguf_tokenizer(index, config, family, path)
                    fingerprint = digest.result()
        return cls(config, {}, tokenizer, path, fingerprint, family, unread=True)

    def engine(self, lora: LoraPairs, lora_scale: float, consume: bool = False) -> Engine:
        """An engine over these weights with the LoRA pairs {"blk.{i}.{module}": (A, B)} merged in
        (W + scale * B @ A). With consume, the weights are merged in their own memory and taken
        out of this BaseModel (a base loaded for one function is never held twice)."""
        kind = _KINDS[self.family.name]
        if self.unread:
            if not consume:
                raise PawError(f"{self.source}: this interpreter was opened for one function "
                               f"(BaseModel.for_one_function); load it with BaseModel.load to share it")
            self.unread = False
            with malformed_file(self.source, f"{self.family.model} interpreter"):
                return kind.load_engine(self.source, self.config, lora, lora_scale)
        return kind.engine(self.weights, self.config, lora, lora_scale, consume)


def _check_shapes(weights: Mapping[str, object], config: ModelConfig, family: Family, source: Path) -> None:
    expected = config.tensor_shapes()
    if "output.weight" in weights:  # an untied head (GPT-2's config does not say; Qwen3's does)
        expected["output.weight"] = (config.n_vocab, config.n_embd)
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise InvalidFileError(f"{source}: unexpected tensors for a {family.model} model: {', '.join(unknown[:5])}")
    for name, shape in expected.items():
        if name not in weights:
            raise InvalidFileError(f"{source}: tensor {name} is missing")
        if tuple(weights[name].shape) != shape:
            raise InvalidFileError(f"{source}: {name} has shape {tuple(weights[name].shape)}, expected {shape}")


def read_header(path: str | os.PathLike[str]) -> tuple[ModelConfig, BPETokenizer]:
    """Config and tokenizer of an interpreter (GGUF file or HF folder), checked, without loading its weights."""
    path = Path(path)
    if path.is_dir():
        kind = _KINDS[_hf_family(path).name]
        config = kind.hf_config(path)
        return config, kind.hf_tokenizer(path, config)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such interpreter model (a GGUF file or an HF GPT-2 or Qwen3 folder)")
    reader, family, config = _gguf_config(path)
    return config, _gguf_tokenizer(reader, config, family, path)


def _gguf_config(path: Path) -> tuple[GGUFIndex, Family, ModelConfig]:
    """The index, family and checked hyperparameters and tensor shapes of an interpreter GGUF."""
    reader = read_index(path)  # gguf-py's GGUFReader takes ~2 s over a 50k-token vocabulary; this ~0.1 s
    # A program's adapter.gguf names the interpreter's architecture too: without this check it
    # passed the one below and failed on a hyperparameter only a model has.
    if (get_field(reader, "adapter.type", path, None) == "lora"
            or get_field(reader, "general.type", path, None) == "adapter"):
        arch = get_field(reader, "general.architecture", path, None)
        runtime = next((f.runtime_id for f in FAMILIES.values() if f.arch == arch), COMPACT.runtime_id)
        raise IncompatibleModelError(f"{path}: is a LoRA adapter, not a base model; pass the interpreter GGUF "
                                     f"({runtime}.gguf) instead")
    family = family_of_arch(get_str(reader, "general.architecture", path), str(path))
    config = _KINDS[family.name].gguf_config(reader, path)
    # Check every shape from the header before dequantizing anything.
    _check_shapes({t.name: _ShapeOnly(numpy_shape(t)) for t in reader.tensors}, config, family, path)
    return reader, family, config


def _gpt2_gguf_config(reader: GGUFIndex, path: Path) -> GPT2Config:
    arch = COMPACT.arch
    n_embd = get_int(reader, f"{arch}.embedding_length", path)
    tokens = get_field(reader, "tokenizer.ggml.tokens", path)
    if not isinstance(tokens, list):
        raise InvalidFileError(f"{path}: tokenizer.ggml.tokens is not a list of strings")
    return GPT2Config(
        n_vocab=len(tokens),
        n_ctx=get_int(reader, f"{arch}.context_length", path),
        n_embd=n_embd,
        n_head=get_int(reader, f"{arch}.attention.head_count", path),
        n_layer=get_int(reader, f"{arch}.block_count", path),
        n_ff=get_int(reader, f"{arch}.feed_forward_length", path, default=4 * n_embd),
        eps=get_float(reader, f"{arch}.attention.layer_norm_epsilon", path),
    ).validate(path)


def _gguf_tokenizer(reader: GGUFIndex, config: ModelConfig, family: Family, path: Path) -> BPETokenizer:
    tokenizer = BPETokenizer.from_gguf(reader, path)  # of the family the file's architecture names
    if tokenizer.n_vocab != config.n_vocab:  # both come from tokenizer.ggml.tokens, read by two readers
        raise InvalidFileError(f"{path}: the tokenizer has {tokenizer.n_vocab} tokens but tokenizer.ggml.tokens "
                               f"lists {config.n_vocab}; re-convert the model with `{family.convert_command}`")
    return tokenizer


def _load_gguf(path: Path, header: tuple[GGUFIndex, Family, ModelConfig] | None = None) -> BaseModel:
    index, family, config = header or _gguf_config(path)
    # Jobs at once: NumPy dequantizes and hashlib hashes with the GIL released, while the tokenizer
    # is built in Python here. The fingerprint is the sha256 of the whole file: it costs little
    # wall time next to dequantizing (a second read comes from the page cache), so nothing weaker
    # is used.
    with ThreadPoolExecutor(max_workers=2) as pool:
        digest = pool.submit(file_sha256, path)
        weights = pool.submit(_KINDS[family.name].gguf_weights, index, path)
        tokenizer = _gguf_tokenizer(index, config, family, path)
        return BaseModel(config, weights.result(), tokenizer, path, digest.result(), family)


def _gpt2_gguf_weights(index: GGUFIndex, path: Path) -> dict[str, np.ndarray]:
    """float32 tensors by name in file order, dequantized in two halves at once."""
    in_file_order = sorted(index.tensors, key=lambda t: t.data_offset)
    with ThreadPoolExecutor(max_workers=2) as pool:
        halves = [pool.submit(_read_tensors, index, path, part) for part in _halves_by_size(in_file_order)]
        loaded = {name: array for half in halves for name, array in half.result().items()}
    return {t.name: loaded[t.name] for t in in_file_order}


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


def _hf_family(folder: Path) -> Family:
    """An HF folder's family from config.json's model_type (absent: GPT-2, as early GPT-2 folders)."""
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return COMPACT  # the GPT-2 reader says what is wrong with the file
    model_type = cfg.get("model_type", COMPACT.arch) if isinstance(cfg, dict) else COMPACT.arch
    # HF's model_type is the GGUF architecture name for both; another is refused by GPT-2's reader
    return next((f for f in FAMILIES.values() if f.arch == model_type), COMPACT)


def _load_hf_dir(folder: Path, kind: "_Kind") -> BaseModel:
    config = kind.hf_config(folder)
    weights, files = kind.hf_weights(folder, config)
    _check_shapes(weights, config, kind.family, files[0] if len(files) == 1 else folder)
    tokenizer = kind.hf_tokenizer(folder, config)
    if tokenizer.n_vocab != config.n_vocab:
        raise InvalidFileError(f"{folder}: tokenizer has {tokenizer.n_vocab} tokens but config.json says vocab_size {config.n_vocab}")
    return BaseModel(config, weights, tokenizer, folder, _hf_fingerprint(folder, files), kind.family)


def _hf_fingerprint(folder: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in [folder / "config.json", *files]:
        h.update(file_sha256(p).encode())
    return h.hexdigest()


# -- what differs between the families ----------------------------------------------------------

def _gpt2_hf_weights(folder: Path, config: GPT2Config) -> tuple[dict[str, np.ndarray], list[Path]]:
    return dict(hf_gpt2_tensors(folder)), [folder / "model.safetensors"]


def _gpt2_engine(weights: dict[str, np.ndarray], config: GPT2Config, lora: LoraPairs, scale: float,
                 consume: bool) -> Engine:
    from .gpt2_weights import Weights

    return Engine.gpt2(Weights.from_gguf_names(weights, config, lora, scale, consume=consume), config)


def _qwen3_hf_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _qwen3_hf_weights(folder: Path, config: Qwen3Config) -> tuple[dict[str, np.ndarray], list[Path]]:
    from .qwen3_weights import read_hf_tensors

    return read_hf_tensors(folder)[1], _qwen3_hf_files(folder)


def _qwen3_gguf_weights(index: GGUFIndex, path: Path) -> dict[str, np.ndarray]:
    # row blocks: K-quant decoders hold temporaries several times their output, which for the
    # 151,936-row Q6_K embedding would be gigabytes
    from .qwen3_weights import read_gguf_tensors

    return read_gguf_tensors(path)[1]


def _qwen3_engine(weights: dict[str, np.ndarray], config: Qwen3Config, lora: LoraPairs, scale: float,
                  consume: bool) -> Engine:
    from .qwen3_weights import Qwen3Weights

    return Engine.qwen3(Qwen3Weights.from_gguf_names(weights, config, lora, scale, consume=consume), config)


def _qwen3_load_engine(path: Path, config: Qwen3Config, lora: LoraPairs, scale: float) -> Engine:
    from .qwen3_weights import load_qwen3

    loaded, weights = load_qwen3(path, lora, scale)
    if loaded != config:  # the file changed between opening it and reading its weights
        raise InvalidFileError(f"{path}: its hyperparameters changed while it was being loaded")
    return Engine.qwen3(weights, config)


@dataclass(frozen=True)
class _Kind:
    """How one family's interpreter is read and run."""

    family: Family
    gguf_config: Callable[[GGUFIndex, Path], ModelConfig]
    gguf_weights: Callable[[GGUFIndex, Path], dict[str, np.ndarray]]  # float32 under GGUF names, checked
    hf_config: Callable[[Path], ModelConfig]
    hf_weights: Callable[[Path, ModelConfig], tuple[dict[str, np.ndarray], list[Path]]]  # and the files they came from
    hf_files: Callable[[Path], list[Path]]  # the weight files of an HF folder (its fingerprint)
    hf_tokenizer: Callable[[Path, ModelConfig], BPETokenizer]
    engine: Callable[[dict[str, np.ndarray], ModelConfig, LoraPairs, float, bool], Engine]
    # The weights read from a file straight into an engine with a LoRA merged (BaseModel.for_one_function)
    load_engine: Callable[[Path, ModelConfig, LoraPairs, float], Engine] | None = None

    def load_hf(self, folder: Path) -> BaseModel:
        return _load_hf_dir(folder, self)


_KINDS: dict[str, _Kind] = {
    COMPACT.name: _Kind(
        COMPACT, _gpt2_gguf_config, _gpt2_gguf_weights,
        lambda folder: hf_gpt2_config(folder / "config.json", INTERPRETER_SOURCES), _gpt2_hf_weights,
        lambda folder: [folder / "model.safetensors"], lambda folder, config: BPETokenizer.from_hf_dir(folder),
        _gpt2_engine),
    STANDARD.name: _Kind(
        STANDARD, Qwen3Config.from_gguf, _qwen3_gguf_weights,
        lambda folder: Qwen3Config.from_hf(folder / "config.json"), _qwen3_hf_weights, _qwen3_hf_files,
        lambda folder, config: BPETokenizer.from_hf_qwen_dir(folder, config.n_vocab, STANDARD), _qwen3_engine,
        _qwen3_load_engine),
}
