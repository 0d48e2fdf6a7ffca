"""Qwen3's weights in the one form both forward passes run on (`qwen3.py`, the reference, and
`qwen3_packed.py`, the runtime's): matrices in the GGUF Linear layout (d_out, d_in), float32,
C-contiguous, a program's LoRA merged in by `gpt2_weights.merge_lora` (the one LoRA merge).

Each layer's q, k and v projections are stored stacked in one matrix, and so are the MLP's gate and
up projections: one product instead of three (two) per step, and no copy to stack them later. The
single matrices are views (`Qwen3Layer.attn_q`, ...).

Reading files: `read_gguf_tensors` (any type gguf-py dequantizes: the published interpreter is
Q6_K) and `read_hf_tensors` (an HF folder's safetensors) give float32 tensors under GGUF names,
read and decoded one tensor at a time (large ones in row blocks), so a load holds one float32 copy
of the model plus one block; `Qwen3Weights.from_gguf_names(..., consume=True)` then stacks and
merges in place of the tensors it takes."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import IncompatibleModelError, InvalidFileError, ModelNotFoundError
from .gguf_file import MODEL_LIMITS, GGUFIndex, TensorInfo, get_str, numpy_shape, read_index, tensor_to_f32
from .gpt2_weights import check_lora_pairs, merge_lora
from .qwen3_layout import ARCH, LORA_MODULES, Qwen3Config

_T = GGMLQuantizationType
# Tensor types a Qwen3 interpreter file may hold: the float types, and every quantized type gguf-py
# dequantizes that llama.cpp's quantizer writes for such models (the published file is Q6_K, with
# Q8_0 or Q4_K/Q5_K for other choices). Decoded by gguf_file.dequantize (its own F32/F16/BF16/Q8_0/
# Q4_0 kernels, bit-identical to gguf-py's), else gguf.quants.dequantize.
QWEN3_WEIGHT_TYPES = frozenset({_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1,
                                _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K, _T.IQ4_NL, _T.IQ4_XS})
# Float32 values decoded at once from a large tensor: bounds the decoders' temporaries (gguf-py's
# K-quant decoders hold several arrays the size of their output) to a few tens of MB.
_DECODE_BLOCK_FLOATS = 4 << 20


@dataclass(frozen=True)
class Qwen3Layer:
    """One decoder layer. A Linear layer is `x @ w.T` for rows x (Qwen3 has no biases)."""

    attn_norm: np.ndarray  # (d,)
    attn_qkv: np.ndarray  # (q + 2 kv, d): attn_q (q, d), attn_k (kv, d), attn_v (kv, d) stacked
    attn_q_norm: np.ndarray  # (head_dim,), applied to each query head
    attn_k_norm: np.ndarray  # (head_dim,), applied to each key head
    attn_output: np.ndarray  # (d, q)
    ffn_norm: np.ndarray  # (d,)
    ffn_gate_up: np.ndarray  # (2 n_ff, d): ffn_gate, then ffn_up
    ffn_down: np.ndarray  # (d, n_ff)

    @property
    def attn_q(self) -> np.ndarray:
        return self.attn_qkv[:self.attn_output.shape[1]]

    @property
    def attn_k(self) -> np.ndarray:
        q = self.attn_output.shape[1]
        return self.attn_qkv[q:q + (len(self.attn_qkv) - q) // 2]

    @property
    def attn_v(self) -> np.ndarray:
        q = self.attn_output.shape[1]
        return self.attn_qkv[q + (len(self.attn_qkv) - q) // 2:]

    @property
    def ffn_gate(self) -> np.ndarray:
        return self.ffn_gate_up[:self.ffn_down.shape[1]]

    @property
    def ffn_up(self) -> np.ndarray:
        return self.ffn_gate_up[self.ffn_down.shape[1]:]


@dataclass(frozen=True)
class Qwen3Weights:
    head: np.ndarray  # (n_vocab, d): logits of final rows h are h @ head.T (the embedding when tied)
    token_embd: np.ndarray | None  # (n_vocab, d), only when the head is not tied to the embedding
    output_norm: np.ndarray  # (d,)
    layers: tuple[Qwen3Layer, ...]

    @classmethod
    def from_gguf_names(cls, weights: Mapping[str, np.ndarray], config: Qwen3Config,
                        lora: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, lora_scale: float = 1.0,
                        consume: bool = False) -> "Qwen3Weights":
        """GGUF-named Linear-layout float32 tensors with the LoRA pairs {"blk.{i}.{module}": (A (r, d_in),
        B (d_out, r))} merged: W + scale * B @ A. With consume, entries are popped from `weights` (a
        dict) as they are used, so the float32 model is never held twice; without it the inputs are
        not modified (the stacked matrices are new arrays, the others shared when no LoRA targets them)."""
        get = weights.pop if consume else weights.__getitem__  # type: ignore[attr-defined]
        lora = lora or {}
        check_lora_pairs(lora, config, LORA_MODULES, "Qwen3")
        _check_tensors({n: tuple(a.shape) for n, a in weights.items()}, config, "the Qwen3 weights")
        scale = np.float32(lora_scale)
        q, kv, d, ff = config.n_head * config.head_dim, config.n_head_kv * config.head_dim, config.n_embd, config.n_ff
        product = np.empty(max(q, ff) * max(d, ff), np.float32) if lora else None  # one scratch for every LoRA product

        def merged(name: str, w: np.ndarray) -> np.ndarray:
            """w with its LoRA merged in: in place when w is this load's own array."""
            pair = lora.get(name)
            return w if pair is None else merge_lora(w, *pair, scale, product, in_place=True)

        def matrix(name: str) -> np.ndarray:
            w = np.ascontiguousarray(get(f"{name}.weight"), np.float32)
            own = consume and w.flags.writeable
            pair = lora.get(name)
            if pair is None:
                return w
            return merge_lora(w, *pair, scale, product, in_place=own)

        def stacked(p: str, modules: tuple[str, ...], rows: tuple[int, ...]) -> np.ndarray:
            out = np.empty((sum(rows), d), np.float32)
            r0 = 0
            for module, n in zip(modules, rows):
                np.copyto(out[r0:r0 + n], get(f"{p}{module}.weight"))
                merged(p + module, out[r0:r0 + n])
                r0 += n
            return out

        layers = []
        for i in range(config.n_layer):
            p = f"blk.{i}."
            layers.append(Qwen3Layer(
                attn_norm=get(p + "attn_norm.weight"),
                attn_qkv=stacked(p, ("attn_q", "attn_k", "attn_v"), (q, kv, kv)),
                attn_q_norm=get(p + "attn_q_norm.weight"),
                attn_k_norm=get(p + "attn_k_norm.weight"),
                attn_output=matrix(p + "attn_output"),
                ffn_norm=get(p + "ffn_norm.weight"),
                ffn_gate_up=stacked(p, ("ffn_gate", "ffn_up"), (ff, ff)),
                ffn_down=matrix(p + "ffn_down"),
            ))
        untied = "output.weight" in weights
        head = get("output.weight") if untied else get("token_embd.weight")
        return cls(head, get("token_embd.weight") if untied else None, get("output_norm.weight"), tuple(layers))

    @classmethod
    def empty(cls, config: Qwen3Config) -> "Qwen3Weights":
        """Weights of this shape, not yet filled (np.empty: no page is touched until written)."""
        q, kv, d, ff = config.n_head * config.head_dim, config.n_head_kv * config.head_dim, config.n_embd, config.n_ff

        def e(*shape: int) -> np.ndarray:
            return np.empty(shape, np.float32)

        layers = tuple(Qwen3Layer(e(d), e(q + 2 * kv, d), e(config.head_dim), e(config.head_dim), e(d, q), e(d),
                                  e(2 * ff, d), e(d, ff)) for _ in range(config.n_layer))
        return cls(e(config.n_vocab, d), None if config.tied else e(config.n_vocab, d), e(d), layers)

    def tensor_views(self) -> dict[str, np.ndarray]:
        """GGUF name -> the array (or view of a stacked array) holding that tensor."""
        out = {"output_norm.weight": self.output_norm}
        if self.token_embd is None:
            out["token_embd.weight"] = self.head
        else:
            out["token_embd.weight"], out["output.weight"] = self.token_embd, self.head
        for i, layer in enumerate(self.layers):
            for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output",
                         "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
                out[f"blk.{i}.{name}.weight"] = getattr(layer, name)
        return out

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """(N, d) embedding rows of the tokens."""
        return (self.head if self.token_embd is None else self.token_embd)[tokens]


def _check_tensors(shapes: Mapping[str, tuple[int, ...]], config: Qwen3Config, source: Path | str,
                   fix: str = "the file is not a complete Qwen3 model of its own hyperparameters") -> None:
    """Every tensor the config needs, of its shape, and no other: checked before anything is decoded."""
    expected = config.tensor_shapes()
    if config.tied and "output.weight" in shapes:  # from_gguf ties exactly when output.weight is absent
        expected["output.weight"] = (config.n_vocab, config.n_embd)
    unknown = sorted(set(shapes) - set(expected))
    if unknown:
        raise InvalidFileError(f"{source}: unexpected tensors for a {config.n_layer}-layer Qwen3: "
                               f"{', '.join(unknown[:5])} ({fix})")
    for name, shape in expected.items():
        if name not in shapes:
            raise InvalidFileError(f"{source}: tensor {name} is missing ({fix})")
        if tuple(shapes[name]) != shape:
            raise InvalidFileError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, expected {shape} "
                                   f"from the model's hyperparameters ({fix})")


# -- files -----------------------------------------------------------------------------------------

def read_gguf_config(path: str | os.PathLike[str]) -> tuple[GGUFIndex, Qwen3Config]:
    """The index of a Qwen3 GGUF and its checked hyperparameters and tensor shapes (no tensor read)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such Qwen3 interpreter file (a GGUF, e.g. qwen3-0.6b-q6_k.gguf)")
    index = read_index(path, MODEL_LIMITS)
    arch = get_str(index, "general.architecture", path)
    if arch != ARCH:
        raise IncompatibleModelError(f"{path}: general.architecture is {arch!r}, expected {ARCH!r} (a Qwen3 interpreter)")
    config = Qwen3Config.from_gguf(index, path)
    _check_tensors({t.name: numpy_shape(t) for t in index.tensors}, config, path,
                   "re-convert it with `paw-lite convert qwen3` or download the published file again")
    for t in index.tensors:
        if t.tensor_type not in QWEN3_WEIGHT_TYPES:
            raise InvalidFileError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; supported: "
                                   f"{', '.join(sorted(q.name for q in QWEN3_WEIGHT_TYPES))}")
    return index, config


def read_gguf_tensors(path: str | os.PathLike[str], on_tensor: Callable[[str], None] | None = None
                      ) -> tuple[Qwen3Config, dict[str, np.ndarray]]:
    """(config, GGUF name -> float32 array) of a Qwen3 GGUF, decoded tensor by tensor in file order
    (large tensors in row blocks); on_tensor(name) after each."""
    index, config = read_gguf_config(path)
    out = {t.name: np.empty(numpy_shape(t), np.float32) for t in index.tensors}
    _fill_from_gguf(index, out, on_tensor)
    return config, out


def _fill_from_gguf(index: GGUFIndex, out: Mapping[str, np.ndarray], on_tensor: Callable[[str], None] | None) -> None:
    """Decode every tensor of the file into out[name] (float32 arrays of its shape), reading and
    decoding blocks of whole rows: the file's bytes and the decoders' temporaries stay small."""
    path = index.path
    with open(path, "rb") as f:
        for info in sorted(index.tensors, key=lambda t: t.data_offset):
            target = out[info.name]
            rows = target.shape[0] if target.ndim == 2 else 1
            cols = target.shape[-1]
            block, type_bytes = GGML_QUANT_SIZES[info.tensor_type]
            row_bytes = cols // block * type_bytes  # read_index checked cols is a multiple of the block
            step = max(1, _DECODE_BLOCK_FLOATS // cols)
            flat = target.reshape(rows, cols)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                f.seek(info.data_offset + r0 * row_bytes)
                raw = f.read((r1 - r0) * row_bytes)
                if len(raw) != (r1 - r0) * row_bytes:  # the file shrank since read_index
                    raise InvalidFileError(f"{path}: tensor {info.name} runs past the end of the file (truncated?)")
                part = TensorInfo(info.name, np.array([cols, r1 - r0], np.uint64), info.tensor_type, 0, len(raw))
                flat[r0:r1] = tensor_to_f32(part, raw, path, QWEN3_WEIGHT_TYPES)
            if on_tensor is not None:
                on_tensor(info.name)


def read_hf_tensors(folder: str | os.PathLike[str], on_tensor: Callable[[str], None] | None = None
                    ) -> tuple[Qwen3Config, dict[str, np.ndarray]]:
    """(config, GGUF name -> float32 array) of an HF Qwen3 folder (config.json and safetensors, sharded
    or not, bf16/f16/f32), through the converter's name map and checks (`convert.qwen3.Qwen3Source`)."""
    source = _hf_source(folder)
    out = {name: np.empty(st.shape(key), np.float32) for name, (key, st) in source.tensors.items()}
    _fill_from_hf(source, out, on_tensor)
    return source.config, out


def _hf_source(folder: str | os.PathLike[str]):
    from .convert.qwen3 import Qwen3Source

    return Qwen3Source(folder)


def _fill_from_hf(source, out: Mapping[str, np.ndarray], on_tensor: Callable[[str], None] | None) -> None:
    """Every tensor of the folder into out[GGUF name], read in blocks of whole rows."""
    from .convert.qwen3 import read_rows
    from .safetensors_file import bf16_to_f32

    for name, (key, st) in source.tensors.items():
        target = out[name]
        rows = target.shape[0] if target.ndim == 2 else 1
        step = max(1, _DECODE_BLOCK_FLOATS // target.shape[-1])
        flat = target.reshape(rows, -1)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            raw = read_rows(st, key, r0, r1).reshape(r1 - r0, -1)
            flat[r0:r1] = bf16_to_f32(raw) if st.dtype_name(key) == "BF16" else raw
        if not np.isfinite(target).all():
            raise InvalidFileError(f"{st.path}: {key} holds NaN or Inf values")
        if on_tensor is not None:
            on_tensor(name)


def load_qwen3(path: str | os.PathLike[str], lora: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
               lora_scale: float = 1.0, on_tensor: Callable[[str], None] | None = None) -> tuple[Qwen3Config, Qwen3Weights]:
    """A Qwen3 GGUF file or HF folder as (config, weights) with the LoRA pairs merged. Every tensor
    is decoded straight into its place in the final (stacked) arrays and its LoRA merged there:
    the process holds the float32 model once, plus a few MB of decoding buffers."""
    path = Path(path).expanduser()
    if path.is_dir():
        source = _hf_source(path)
        config, fill = source.config, lambda views: _fill_from_hf(source, views, on_tensor)
    else:
        index, config = read_gguf_config(path)
        fill = lambda views: _fill_from_gguf(index, views, on_tensor)  # noqa: E731
    lora = lora or {}
    check_lora_pairs(lora, config, LORA_MODULES, "Qwen3")
    weights = Qwen3Weights.empty(config)
    fill(weights.tensor_views())
    views = weights.tensor_views()
    scale = np.float32(lora_scale)
    largest = max((views[f"{t}.weight"].size for t in lora), default=0)
    product = np.empty(largest, np.float32)
    for target, (a, b) in lora.items():
        merge_lora(views[f"{target}.weight"], a, b, scale, product, in_place=True)
    return config, weights
