"""`lora_mapper.pt` (a torch state dict) -> `mapper.safetensors` (fp32), without torch.

Keys and shapes are validated against the public reimplementation avra-m3/program-as-weights-server, checked against the published lora_mapper.pt shapes as the compiler's mapper defines them
(`paw_lite.compiler.mapper.MapperShape`), sized by the compiler meta (rank, number of bases), the
interpreter (layers, module widths) and the compiler's hidden width; the written file is then
checked by the same reader the compiler uses."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from paw_lite.atomic import atomic_path
from paw_lite.compiler.config import CompilerMeta
from paw_lite.compiler.mapper import Mapper, MapperShape, key_mismatch
from paw_lite.errors import IncompatibleModelError, InvalidFileError
from paw_lite.families import COMPACT, STANDARD, Family
from paw_lite.gpt2_layout import GPT2Config
from paw_lite.qwen3_layout import Qwen3Config

from .torch_checkpoint import load_state_dict

# The published interpreters and compiler (the model cards of programasweights/paw-4b-gpt2 and
# paw-4b-qwen3-0.6b, Qwen/Qwen3-0.6B's config.json, the official SDK): GPT-2 124M, Qwen3-0.6B, and the
# Qwen3-4B compilers' hidden width 2560.
PAW_GPT2 = GPT2Config(n_vocab=50257, n_ctx=2048, n_embd=768, n_head=12, n_layer=12, n_ff=3072, eps=1e-5)
QWEN3_06B = Qwen3Config(n_vocab=151936, n_ctx=40960, n_embd=1024, n_ff=3072, n_layer=28, n_head=16, n_head_kv=8,
                        head_dim=128, eps=1e-6, rope_theta=1_000_000.0, tied=True)
PUBLISHED_INTERPRETERS = {COMPACT.name: PAW_GPT2, STANDARD.name: QWEN3_06B}
QWEN3_4B_HIDDEN = 2560
DEFAULT_RANK = 64
DEFAULT_BASES = 64


def mapper_shape(meta: CompilerMeta | None, interpreter: GPT2Config | Qwen3Config | None = None,
                 hidden: int = QWEN3_4B_HIDDEN, family: Family | None = None) -> MapperShape:
    """The expected mapper shape. The family: given, else the meta's `interpreter_model`, else
    Compact; without an interpreter file, the family's published interpreter; without meta, the
    published compilers' rank 64 and 64 bases (their meta.json files)."""
    family = family or (meta.family() if meta is not None else None) or COMPACT
    if interpreter is not None and not isinstance(interpreter, type(PUBLISHED_INTERPRETERS[family.name])):
        raise IncompatibleModelError(f"{meta.source if meta else 'the mapper'}: a mapper for {family.name} programs "
                                     f"({family.interpreter}), but the interpreter given is not a {family.arch} model")
    return MapperShape(hidden=hidden, interpreter=interpreter or PUBLISHED_INTERPRETERS[family.name],
                       rank=meta.lora_rank if meta else DEFAULT_RANK,
                       n_bases=meta.lora_num_bases if meta else DEFAULT_BASES)


def convert_mapper(src: str | os.PathLike[str], out: str | os.PathLike[str], shape: MapperShape,
                   on_tensor: Callable[[str], None] | None = None) -> Path:
    """Read the torch state dict safely, validate every key and shape, write fp32 safetensors atomically."""
    src, out = Path(src), Path(out)
    state = load_state_dict(src)
    if "trunk.0.bias" not in state or state["trunk.0.bias"].ndim != 1:
        raise InvalidFileError(f"{src}: no vector trunk.0.bias; not a PAW lora_mapper state dict (keys {sorted(state)[:6]})")
    expected = shape.expected(state["trunk.0.bias"].shape[0])
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise key_mismatch(src, shape, missing, unknown)
    tensors: dict[str, np.ndarray] = {}
    for key, want in expected.items():
        arr = state[key]
        if tuple(arr.shape) != want:
            raise IncompatibleModelError(f"{src}: {key} has shape {tuple(arr.shape)}, expected {want} ({shape.describe()})")
        if arr.dtype.kind != "f":
            raise InvalidFileError(f"{src}: {key} has dtype {arr.dtype}, expected floating point")
        tensors[key] = np.ascontiguousarray(arr, dtype=np.float32)  # f16/bf16 widen exactly
        if not np.isfinite(tensors[key]).all():
            raise InvalidFileError(f"{src}: {key} holds NaN or Inf values")
        if on_tensor:
            on_tensor(key)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "paw-mapper", "source": src.name})
        Mapper.check(tmp, shape)  # the compiler's own reader accepts it
    return out
