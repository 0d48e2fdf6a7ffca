"""LoRA programs for the GPT-2 interpreter: read and write `adapter.gguf` and PEFT folders,
validate against the base model, merge into its weights."""

from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, quants

from .atomic import atomic_dir, atomic_path, check_writable
from .errors import IncompatibleModelError, InvalidFileError, PawError, malformed_file
from .gguf_file import (ADAPTER_LIMITS, ADAPTER_TYPES, GGUF_MAGIC, GGUFIndex, get_float, get_str, iter_tensors, numpy_shape, read_index,
                        read_index_bytes, tensor_to_f32)
from .gpt2_layout import ARCH, LORA_MODULES, GPT2Config, gguf_to_peft_name, peft_to_gguf_name
from .gpt2_weights import Weights
from .program import ADAPTER, Program
from .safetensors_file import SafetensorsFile

_NAME_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight\.lora_(a|b)$")
# PEFT matches module-name suffixes: "c_proj" covers both attn.c_proj and mlp.c_proj.
PEFT_TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]
ADAPTER_WRITE_TYPES = {"q4_0": GGMLQuantizationType.Q4_0, "q8_0": GGMLQuantizationType.Q8_0,
                       "f16": GGMLQuantizationType.F16, "f32": GGMLQuantizationType.F32}


@dataclass(frozen=True)
class LoraAdapter:
    """Per target `blk.{i}.{module}`: A (r, d_in) and B (d_out, r). Applied as W + (alpha/r) B A."""

    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    alpha: float
    rank: int
    tensor_type: str
    source: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], config: GPT2Config) -> "LoraAdapter":
        """An adapter.gguf file, checked against the base model's config."""
        return cls._from_index(read_index(path, ADAPTER_LIMITS), config)

    @classmethod
    def from_gguf_bytes(cls, data: bytes, config: GPT2Config, source: str) -> "LoraAdapter":
        """An adapter.gguf held in memory (a program's member, read with no temporary file);
        errors name `source`, e.g. "prog.paw: adapter.gguf"."""
        return cls._from_index(read_index_bytes(data, source, ADAPTER_LIMITS), config)

    @classmethod
    def from_program(cls, program: Program, config: GPT2Config) -> "LoraAdapter":
        """A program's adapter.gguf member; errors name it inside the program ("prog.paw: adapter.gguf")."""
        return cls.from_gguf_bytes(program.adapter_gguf, config, f"{program.source}: {ADAPTER}")

    @classmethod
    def _from_index(cls, index: GGUFIndex, config: GPT2Config) -> "LoraAdapter":
        path = index.path
        for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", ARCH)):
            got = get_str(index, key, path)
            if got != want:
                raise IncompatibleModelError(f"{path}: {key} is {got!r}, expected {want!r}")
        alpha = get_float(index, "adapter.lora.alpha", path)
        rank = _validate_shapes({t.name: numpy_shape(t) for t in index.tensors}, config, path)
        tensors = {info.name: tensor_to_f32(info, raw, path, ADAPTER_TYPES) for info, raw in iter_tensors(index)}
        kind = Counter(t.tensor_type.name for t in index.tensors).most_common(1)[0][0]
        return cls(_pair_up(tensors), _check_alpha(alpha, path), rank, kind, str(path))

    @classmethod
    def from_peft_dir(cls, folder: str | os.PathLike[str], config: GPT2Config) -> "LoraAdapter":
        with malformed_file(folder, "PEFT LoRA folder"):
            return cls._from_peft_dir(Path(folder), config)

    @classmethod
    def _from_peft_dir(cls, folder: Path, config: GPT2Config) -> "LoraAdapter":
        cfg_path = folder / "adapter_config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise InvalidFileError(f"{cfg_path}: cannot read the PEFT config: {exc}") from exc
        if not isinstance(cfg, dict):
            raise InvalidFileError(f"{cfg_path}: is a JSON {type(cfg).__name__}, expected an object")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise IncompatibleModelError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
        for flag in ("use_rslora", "use_dora"):
            if cfg.get(flag):
                raise IncompatibleModelError(f"{cfg_path}: {flag} is set; paw_lite applies plain LoRA (alpha / r) only")
        for pattern in ("rank_pattern", "alpha_pattern"):
            if cfg.get(pattern):
                raise IncompatibleModelError(f"{cfg_path}: {pattern} is set; paw_lite needs one rank and alpha for all modules")
        st = SafetensorsFile(folder / "adapter_model.safetensors")
        tensors: dict[str, np.ndarray] = {}
        for key in st.keys():
            name = peft_to_gguf_name(key)
            if name is None:
                raise InvalidFileError(f"{st.path}: tensor {key!r} is not a LoRA weight of a GPT-2 target module")
            tensors[name] = st.f32(key)
        rank = _validate_shapes({n: a.shape for n, a in tensors.items()}, config, st.path)
        if int(cfg.get("r", rank)) != rank:
            raise InvalidFileError(f"{cfg_path}: r is {cfg.get('r')} but the tensors have rank {rank}")
        for name, arr in tensors.items():
            if not np.isfinite(arr).all():
                raise InvalidFileError(f"{st.path}: {gguf_to_peft_name(name)} holds NaN or Inf values")
        alpha = _check_alpha(float(cfg.get("lora_alpha", rank)), cfg_path)
        return cls(_pair_up(tensors), alpha, rank, st.dtype_name(st.keys()[0]) if st.keys() else "F32", str(folder))

    def merged_into(self, weights: dict[str, np.ndarray], config: GPT2Config) -> Weights:
        """The base model's GGUF-named tensors with W + scale * B @ A for each target, in the weight
        form both forward passes run on (`Weights.from_gguf_names`, the one merge). The input
        arrays are not modified."""
        return Weights.from_gguf_names(weights, config, self.pairs, self.scale)

    def tensors(self) -> dict[str, np.ndarray]:
        """GGUF name -> array, in a stable order."""
        out = {}
        for target, (a, b) in sorted(self.pairs.items(), key=lambda kv: _target_sort_key(kv[0])):
            out[f"{target}.weight.lora_a"] = a
            out[f"{target}.weight.lora_b"] = b
        return out


def describe_adapter_gguf(data: bytes, source: str) -> dict:
    """Rank, alpha, tensor types and count of an adapter.gguf held in memory, without a base model."""
    index = read_index_bytes(data, source, ADAPTER_LIMITS)
    alpha = get_float(index, "adapter.lora.alpha", source)
    ranks = {numpy_shape(t)[-1] for t in index.tensors if t.name.endswith(".lora_b")}
    types = Counter(t.tensor_type.name for t in index.tensors)
    return {"architecture": get_str(index, "general.architecture", source), "rank": ranks.pop() if len(ranks) == 1 else sorted(ranks),
            "alpha": alpha, "tensor_types": dict(types), "n_tensors": len(index.tensors)}


def _target_sort_key(target: str) -> tuple[int, int]:
    _, layer, module = target.split(".")
    return int(layer), list(LORA_MODULES).index(module)


def _check_alpha(alpha: float, path: Path | str) -> float:
    if not np.isfinite(alpha) or alpha <= 0:
        raise InvalidFileError(f"{path}: LoRA alpha is {alpha}, expected a positive number")
    return alpha


def _validate_shapes(shapes: dict[str, tuple[int, ...]], config: GPT2Config, path: Path | str) -> int:
    """Check names and shapes of LoRA tensors against the base model; return the common rank."""
    if not shapes:
        raise InvalidFileError(f"{path}: the adapter holds no LoRA tensors")
    ranks = set()
    for name, shape in shapes.items():
        m = _NAME_RE.match(name)
        if not m or m.group(2) not in LORA_MODULES:
            raise InvalidFileError(f"{path}: tensor {name!r} is not a GPT-2 LoRA tensor (blk.N.{{{'|'.join(LORA_MODULES)}}}.weight.lora_a|lora_b)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= config.n_layer:
            raise IncompatibleModelError(f"{path}: {name} targets layer {layer}; the base model has {config.n_layer} layers")
        partner = name[:-1] + ("b" if ab == "a" else "a")
        if partner not in shapes:
            raise InvalidFileError(f"{path}: {name} has no matching {partner}")
        d_in, d_out = config.module_dims(module)
        r = shape[0] if ab == "a" else (shape[1] if len(shape) == 2 else -1)
        want = (r, d_in) if ab == "a" else (d_out, r)
        if len(shape) != 2 or tuple(shape) != want or r <= 0:
            raise IncompatibleModelError(f"{path}: {name} has shape {tuple(shape)}, expected {want} for this base model")
        ranks.add(r)
    if len(ranks) != 1:
        raise InvalidFileError(f"{path}: LoRA tensors have different ranks {sorted(ranks)}; one rank is expected")
    return ranks.pop()


def _pair_up(tensors: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    targets = {name.rsplit(".weight.", 1)[0] for name in tensors}
    return {t: (tensors[f"{t}.weight.lora_a"], tensors[f"{t}.weight.lora_b"]) for t in targets}


def adapter_gguf_bytes(tensors: dict[str, np.ndarray], alpha: float, tensor_type: str = "q4_0") -> bytes:
    """`adapter.gguf` as llama.cpp's adapter loader and the official runtime read it, built in
    memory: the bytes gguf-py's GGUFWriter writes (tests/test_fast_load.py compares them), without
    a file to write them through. Metadata: general.architecture, general.type = adapter,
    adapter.type = lora, adapter.lora.alpha; then each tensor as `tensor_type`, 32-byte aligned."""
    if tensor_type not in ADAPTER_WRITE_TYPES:
        raise ValueError(f"adapter type {tensor_type!r} is not one of {sorted(ADAPTER_WRITE_TYPES)}")
    qtype = ADAPTER_WRITE_TYPES[tensor_type]
    kvs = [_gguf_string(key) + struct.pack("<I", GGUFValueType.STRING) + _gguf_string(value)
           for key, value in (("general.architecture", ARCH), ("general.type", "adapter"), ("adapter.type", "lora"))]
    kvs.append(_gguf_string("adapter.lora.alpha") + struct.pack("<If", GGUFValueType.FLOAT32, float(alpha)))
    infos, blobs, offset = [], [], 0
    for name, arr in tensors.items():
        raw = quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype).tobytes()
        ne = arr.shape[::-1]  # GGUF lists the fastest-varying dimension first
        infos.append(_gguf_string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, qtype, offset))
        blobs.append(raw + _padding(len(raw)))
        offset += len(blobs[-1])
    head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + _padding(len(head)) + b"".join(blobs)


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _padding(n: int) -> bytes:
    return bytes(-n % GGUF_DEFAULT_ALIGNMENT)


def write_adapter_gguf(path: str | os.PathLike[str], tensors: dict[str, np.ndarray], alpha: float, tensor_type: str = "q4_0") -> Path:
    """Write `adapter_gguf_bytes(...)` to `path`, atomically."""
    data = adapter_gguf_bytes(tensors, alpha, tensor_type)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


# What a PEFT adapter folder holds (PEFT's save_pretrained also writes a README.md). Writing an
# adapter replaces the folder as a whole, so a folder holding anything else is refused.
PEFT_FOLDER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md"})


def check_peft_folder(folder: str | os.PathLike[str], option: str = "peft") -> None:
    """Refuse, before any work, a PEFT output folder that cannot be written or that holds files
    other than a previous adapter's (they would be deleted with it)."""
    folder = Path(folder)
    check_writable(folder, option, folder=True)
    if folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if p.name not in PEFT_FOLDER_FILES)
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise PawError(f"{option} {folder} holds other files ({shown}); the adapter replaces the whole folder: "
                           f"give a new or empty folder, or one holding only a PEFT adapter")


def whole_number(value: float) -> int | float:
    """A LoRA hyperparameter as JSON: 16, not 16.0, as the published configs write it."""
    return int(value) if float(value).is_integer() else float(value)


def write_peft_dir(folder: str | os.PathLike[str], adapter: LoraAdapter, base_model_name: str = "gpt2") -> Path:
    """Export the PEFT form (adapter_config.json + adapter_model.safetensors), replacing the
    folder as a whole (see `check_peft_folder`)."""
    from safetensors.numpy import save_file

    folder = Path(folder).expanduser()
    check_peft_folder(folder)
    with atomic_dir(folder) as tmp:
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
            "r": adapter.rank, "lora_alpha": whole_number(adapter.alpha), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": True, "target_modules": PEFT_TARGET_MODULES,
            "inference_mode": True,
        }
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file({gguf_to_peft_name(n): np.ascontiguousarray(a, dtype=np.float32) for n, a in adapter.tensors().items()},
                  str(tmp / "adapter_model.safetensors"))
    return folder
