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
from paw_lite.gpt2_layout import GPT2Config

from .torch_checkpoint import load_state_dict

# The published interpreter and compiler (the model card of programasweights/paw-4b-gpt2 and the official SDK): GPT-2 124M, Qwen3-4B hidden width 2560.
PAW_GPT2 = GPT2Config(n_vocab=50257, n_ctx=2048, n_embd=768, n_head=12, n_layer=12, n_ff=3072, eps=1e-5)
QWEN3_4B_HIDDEN = 2560
DEFAULT_RANK = 64
DEFAULT_BASES = 64
_INTERPRETERS = {"gpt2", "openai-community/gpt2", "gpt2-q8_0"}


def mapper_shape(meta: CompilerMeta | None, interpreter: GPT2Config | None = None,
                 hidden: int = QWEN3_4B_HIDDEN) -> MapperShape:
    """The expected mapper shape. Without meta, the model card of programasweights/paw-4b-gpt2 and the official SDK defaults (rank 64, 64 bases)."""
    if meta is not None and interpreter is None and meta.interpreter_model is not None \
            and meta.interpreter_model.lower() not in _INTERPRETERS:
        raise IncompatibleModelError(f"{meta.source}: interpreter_model {meta.interpreter_model!r}; paw_lite maps to "
                                     f"GPT-2 interpreters only (known names: {', '.join(sorted(_INTERPRETERS))})")
    return MapperShape(hidden=hidden, interpreter=interpreter or PAW_GPT2,
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
            raise IncompatibleModelError(
                f"{src}: {key} has shape {tuple(arr.shape)}, expected {want} (compiler width {shape.hidden}, interpreter "
                f"{shape.interpreter.n_layer} layers x {shape.interpreter.n_embd}, rank {shape.rank}, {shape.n_bases} bases)")
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
