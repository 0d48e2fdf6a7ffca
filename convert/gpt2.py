"""GPT-2 interpreters to GGUF in the official `gpt2-q8_0.gguf` layout: Conv1D weights transposed,
tied output, the position table as stored, the tokenizer inside. Weights come from
`model.safetensors` or, without it, `pytorch_model.bin` read by the torch-free safe reader."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType, quants

from paw_lite.atomic import atomic_path
from paw_lite.errors import InvalidFileError, ModelNotFoundError
from paw_lite.hf_gpt2 import hf_gguf_name, hf_gguf_weight, hf_gpt2_config, hf_gpt2_tensors
from paw_lite.gpt2_layout import ARCH, GPT2Config
from paw_lite.tokenizer import hf_vocab

GPT2_TYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0}
# general.file_type counts in llama.cpp's own enum, not the tensor types' (Q8_0 is tensor type 8 but
# file type 7; 8 would be MOSTLY_Q5_0).
_FILE_TYPES = {GGMLQuantizationType.F32: LlamaFileType.ALL_F32, GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
               GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16, GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0}


def tensor_type_for(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Matrices take the requested type; norms, biases and the position table stay F32 (as the official file)."""
    if len(shape) < 2 or name == "position_embd.weight":
        return GGMLQuantizationType.F32
    if qtype == GGMLQuantizationType.Q8_0 and shape[-1] % 32:
        raise InvalidFileError(f"{name}: row length {shape[-1]} is not a multiple of 32, required by Q8_0")
    return qtype


def write_gpt2_gguf(out: str | os.PathLike[str], config: GPT2Config, tensors: Iterable[tuple[str, np.ndarray]],
                    tokens: list[str], merges: list[str], special_ids: list[int], eos_id: int,
                    qtype: GGMLQuantizationType = GGMLQuantizationType.Q8_0, name: str = "gpt2",
                    on_tensor: Callable[[str], None] | None = None) -> Path:
    """Write a GPT-2 GGUF atomically. `tensors` yields (GGUF name, float32 array in Linear layout)."""
    out = Path(out)
    with atomic_path(out) as tmp:
        w = GGUFWriter(tmp, ARCH)
        w.add_name(name)
        w.add_block_count(config.n_layer)
        w.add_context_length(config.n_ctx)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(config.n_ff)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.eps)
        if qtype not in _FILE_TYPES:
            raise ValueError(f"GPT-2 GGUF matrices can be {', '.join(t.name for t in _FILE_TYPES)}, not {qtype.name}")
        w.add_file_type(int(_FILE_TYPES[qtype]))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        special = set(special_ids)
        w.add_token_types([int(TokenType.CONTROL) if i in special else int(TokenType.NORMAL) for i in range(len(tokens))])
        w.add_token_merges(merges)
        w.add_bos_token_id(eos_id)
        w.add_eos_token_id(eos_id)
        w.add_add_bos_token(False)
        for tname, arr in tensors:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            t = tensor_type_for(tname, arr.shape, qtype)
            w.add_tensor(tname, quants.quantize(arr, t), raw_dtype=t)
            if on_tensor:
                on_tensor(tname)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def hf_gpt2_bin_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Like paw_lite.hf_gpt2.hf_gpt2_tensors, from a `pytorch_model.bin` (torch zip format, read without torch)."""
    from .torch_checkpoint import load_state_dict

    state = load_state_dict(path)
    wte = next((k for k in state if k.removeprefix("transformer.") == "wte.weight"), None)
    for key, arr in state.items():
        mapped = hf_gguf_name(key, path)
        if mapped is None:
            continue
        name, transpose = mapped
        if name == "output.weight" and wte is not None and np.array_equal(arr, state[wte]):
            continue  # tied (torch saves lm_head sharing the embedding's storage)
        yield name, hf_gguf_weight(arr.astype(np.float32), transpose, key, path)


def _checked(tensors: Iterable[tuple[str, np.ndarray]], config: GPT2Config, source: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Refuse a tensor whose shape does not match config.json before it is written, and a missing one."""
    expected = config.tensor_shapes()
    expected["output.weight"] = (config.n_vocab, config.n_embd)  # optional: absent when tied
    seen = set()
    for name, arr in tensors:
        if name not in expected or tuple(arr.shape) != expected[name]:
            raise InvalidFileError(f"{source}: {name} has shape {tuple(arr.shape)}, expected {expected.get(name)} from config.json")
        seen.add(name)
        yield name, arr
    missing = sorted(set(expected) - seen - {"output.weight"})
    if missing:
        raise InvalidFileError(f"{source}: missing tensors {missing[:5]}")


def convert_hf_gpt2(folder: str | os.PathLike[str], out: str | os.PathLike[str], qtype: str = "q8_0",
                    on_tensor: Callable[[str], None] | None = None) -> Path:
    folder = Path(folder)
    if qtype not in GPT2_TYPES:
        raise InvalidFileError(f"--type {qtype!r}: GPT-2 converts to one of {', '.join(GPT2_TYPES)}")
    config = hf_gpt2_config(folder / "config.json")
    tokens, merges, special, eos, _ = hf_vocab(folder)
    name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path") or "gpt2"
    if (folder / "model.safetensors").exists():
        source, tensors = folder / "model.safetensors", hf_gpt2_tensors(folder)
    elif (folder / "pytorch_model.bin").exists():
        source = folder / "pytorch_model.bin"
        tensors = hf_gpt2_bin_tensors(source)
    else:
        raise ModelNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    return write_gpt2_gguf(out, config, _checked(tensors, config, source), tokens, merges, special, eos, GPT2_TYPES[qtype],
                           name=str(name), on_tensor=on_tensor)
