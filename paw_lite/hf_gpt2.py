"""Reading an HF GPT-2 folder (config.json, model.safetensors): its hyperparameters as a
GPT2Config and its weights under GGUF names, in the layout paw_lite runs. Used by the interpreter
loader (`BaseModel.load` of a folder) and by the GGUF converter (`paw_lite.convert.gpt2`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import IncompatibleModelError, InvalidFileError, ModelNotFoundError
from .gpt2_layout import GPT2Config, hf_to_gguf_name
from .safetensors_file import SafetensorsFile

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
