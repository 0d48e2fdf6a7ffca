"""LoRA programs for both interpreters (GPT-2 for Compact programs, Qwen3 for Standard ones): read
and write `adapter.gguf` and PEFT folders, validate against the base model, merge into its weights.

What differs between the families is data (`LoraLayout`: the GGUF architecture, the target modules,
the PEFT names); the base model's config (`GPT2Config` or `Qwen3Config`) says which applies."""

from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, quants

from .atomic import atomic_dir, atomic_path, check_writable
from .errors import IncompatibleModelError, InvalidFileError, PawError, malformed_file
from .gguf_file import (ADAPTER_LIMITS, ADAPTER_TYPES, GGUF_MAGIC, GGUFIndex, get_float, get_str, iter_tensors, numpy_shape, read_index,
                        read_index_bytes, tensor_to_f32)
from . import gpt2_layout, qwen3_layout
from .gpt2_layout import GPT2Config
from .families import COMPACT, STANDARD
from .gpt2_weights import Weights
from .qwen3_layout import Qwen3Config
from .program import ADAPTER, Program
from .safetensors_file import SafetensorsFile

_NAME_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight\.lora_(a|b)$")
# PEFT matches module-name suffixes: "c_proj" covers both attn.c_proj and mlp.c_proj.
PEFT_TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]
QWEN3_PEFT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ModelConfig = Union[GPT2Config, Qwen3Config]


@dataclass(frozen=True)
class LoraLayout:
    """What a family's LoRA programs look like: the `general.architecture` of their adapter.gguf,
    the target modules (GGUF name -> (HF module, mapper suffix)), the PEFT names and config."""

    arch: str
    model: str  # for messages
    modules: dict[str, tuple[str, str]]
    peft_to_gguf: Callable[[str], str | None]
    gguf_to_peft: Callable[[str], str]
    peft_target_modules: list[str]
    fan_in_fan_out: bool  # GPT-2's Conv1D stores (d_in, d_out); PEFT's LoRA tensors are (r, d_in), (d_out, r) either way
    base_model_name: str


GPT2_LORA = LoraLayout(gpt2_layout.ARCH, "GPT-2", gpt2_layout.LORA_MODULES, gpt2_layout.peft_to_gguf_name,
                       gpt2_layout.gguf_to_peft_name, PEFT_TARGET_MODULES, True, COMPACT.interpreter)
QWEN3_LORA = LoraLayout(qwen3_layout.ARCH, "Qwen3", qwen3_layout.LORA_MODULES, qwen3_layout.peft_to_gguf_name,
                        qwen3_layout.gguf_to_peft_name, QWEN3_PEFT_TARGET_MODULES, False, STANDARD.interpreter)
LORA_LAYOUTS: dict[str, LoraLayout] = {layout.arch: layout for layout in (GPT2_LORA, QWEN3_LORA)}


def lora_layout(config: ModelConfig) -> LoraLayout:
    """The LoRA layout of the base model `config` describes."""
    if isinstance(config, Qwen3Config):
        return QWEN3_LORA
    if isinstance(config, GPT2Config):
        return GPT2_LORA
    raise TypeError(f"no LoRA layout for a {type(config).__name__}")


def layout_of_arch(arch: str) -> LoraLayout:
    try:
        return LORA_LAYOUTS[arch]
    except KeyError:
        raise ValueError(f"adapter architecture {arch!r} is not one of {sorted(LORA_LAYOUTS)}") from None

ADAPTER_WRITE_TYPES = {"q4_0": GGMLQuantizationType.Q4_0, "q8_0": GGMLQuantizationType.Q8_0,
                       "f16": GGMLQuantizationType.F16, "f32": GGMLQuantizationType.F32}


@dataclass(frozen=True)
class LoraAdapter:
    """Per target `blk.{i}.{module}`: A (r, d_in) and B (d_out, r). Applied as W + (alpha/r) B A,
    as llama.cpp's adapter loader applies it (scale = adapter.lora.alpha / rank)."""

    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    alpha: float
    rank: int
    tensor_type: str
    source: str
    arch: str = gpt2_layout.ARCH  # the base model's GGUF architecture: "gpt2" or "qwen3"

    @property
    def layout(self) -> LoraLayout:
        return layout_of_arch(self.arch)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], config: ModelConfig) -> "LoraAdapter":
        """An adapter.gguf file, checked against the base model's config."""
        return cls._from_index(read_index(path, ADAPTER_LIMITS), config)

    @classmethod
    def from_gguf_bytes(cls, data: bytes, config: ModelConfig, source: str) -> "LoraAdapter":
        """An adapter.gguf held in memory (a program's member, read with no temporary file);
        errors name `source`, e.g. "prog.paw: adapter.gguf"."""
        return cls._from_index(read_index_bytes(data, source, ADAPTER_LIMITS), config)

    @classmethod
    def from_program(cls, program: Program, config: ModelConfig) -> "LoraAdapter":
        """A program's adapter.gguf member; errors name it inside the program ("prog.paw: adapter.gguf")."""
        return cls.from_gguf_bytes(program.adapter_gguf, config, f"{program.source}: {ADAPTER}")

    @classmethod
    def _from_index(cls, index: GGUFIndex, config: ModelConfig) -> "LoraAdapter":
        path = index.path
        layout = lora_layout(config)
        for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", layout.arch)):
            got = get_str(index, key, path)
            if got != want:
                fix = (f": this adapter is for a {got!r} model, not this {layout.model} interpreter"
                       if key == "general.architecture" and got in LORA_LAYOUTS else "")
                raise IncompatibleModelError(f"{path}: {key} is {got!r}, expected {want!r}{fix}")
        alpha = get_float(index, "adapter.lora.alpha", path)
        rank = _validate_shapes({t.name: numpy_shape(t) for t in index.tensors}, config, path)
        tensors = {info.name: tensor_to_f32(info, raw, path, ADAPTER_TYPES) for info, raw in iter_tensors(index)}
        kind = Counter(t.tensor_type.name for t in index.tensors).most_common(1)[0][0]
        return cls(_pair_up(tensors), _check_alpha(alpha, path), rank, kind, str(path), layout.arch)

    @classmethod
    def from_peft_dir(cls, folder: str | os.PathLike[str], config: ModelConfig) -> "LoraAdapter":
        with malformed_file(folder, "PEFT LoRA folder"):
            return cls._from_peft_dir(Path(folder), config)

    @classmethod
    def _from_peft_dir(cls, folder: Path, config: ModelConfig) -> "LoraAdapter":
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
        layout = lora_layout(config)
        st = SafetensorsFile(folder / "adapter_model.safetensors")
        tensors: dict[str, np.ndarray] = {}
        for key in st.keys():
            name = layout.peft_to_gguf(key)
            if name is None:
                raise InvalidFileError(f"{st.path}: tensor {key!r} is not a LoRA weight of a {layout.model} target module")
            tensors[name] = st.f32(key)
        rank = _validate_shapes({n: a.shape for n, a in tensors.items()}, config, st.path)
        if int(cfg.get("r", rank)) != rank:
            raise InvalidFileError(f"{cfg_path}: r is {cfg.get('r')} but the tensors have rank {rank}")
        for name, arr in tensors.items():
            if not np.isfinite(arr).all():
                raise InvalidFileError(f"{st.path}: {layout.gguf_to_peft(name)} holds NaN or Inf values")
        alpha = _check_alpha(float(cfg.get("lora_alpha", rank)), cfg_path)
        return cls(_pair_up(tensors), alpha, rank, st.dtype_name(st.keys()[0]) if st.keys() else "F32", str(folder),
                   layout.arch)

    def merged_into(self, weights: dict[str, np.ndarray], config: ModelConfig):
        """The base model's GGUF-named tensors with W + scale * B @ A for each target, in the weight
        form the family's forward passes run on (`gpt2_weights.Weights` or
        `qwen3_weights.Qwen3Weights`, through the one merge). The input arrays are not modified."""
        layout = lora_layout(config)
        if layout.arch != self.arch:
            raise IncompatibleModelError(f"{self.source}: a {self.layout.model} adapter cannot merge into a {layout.model} model")
        if layout is QWEN3_LORA:
            from .qwen3_weights import Qwen3Weights

            return Qwen3Weights.from_gguf_names(weights, config, self.pairs, self.scale)
        return Weights.from_gguf_names(weights, config, self.pairs, self.scale)

    def tensors(self) -> dict[str, np.ndarray]:
        """GGUF name -> array, in a stable order."""
        out = {}
        modules = list(self.layout.modules)
        for target, (a, b) in sorted(self.pairs.items(), key=lambda kv: _target_sort_key(kv[0], modules)):
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


def _target_sort_key(target: str, modules: list[str]) -> tuple[int, int]:
    _, layer, module = target.split(".")
    return int(layer), modules.index(module)


def _check_alpha(alpha: float, path: Path | str) -> float:
    if not np.isfinite(alpha) or alpha <= 0:
        raise InvalidFileError(f"{path}: LoRA alpha is {alpha}, expected a positive number")
    return alpha


def _validate_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig, path: Path | str) -> int:
    """Check names and shapes of LoRA tensors against the base model; return the common rank."""
    if not shapes:
        raise InvalidFileError(f"{path}: the adapter holds no LoRA tensors")
    layout = lora_layout(config)
    ranks = set()
    for name, shape in shapes.items():
        m = _NAME_RE.match(name)
        if not m or m.group(2) not in layout.modules:
            raise InvalidFileError(f"{path}: tensor {name!r} is not a {layout.model} LoRA tensor "
                                   f"(blk.N.{{{'|'.join(layout.modules)}}}.weight.lora_a|lora_b)")
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


def adapter_gguf_bytes(tensors: dict[str, np.ndarray], alpha: float, tensor_type: str = "q4_0",
                       arch: str = gpt2_layout.ARCH) -> bytes:
    """`adapter.gguf` as llama.cpp's adapter loader and the official runtime read it, built in
    memory: the bytes gguf-py's GGUFWriter writes (tests/test_fast_load.py compares them), without
    a file to write them through. Metadata: general.architecture (`arch`: "gpt2" for Compact
    programs, "qwen3" for Standard ones), general.type = adapter, adapter.type = lora,
    adapter.lora.alpha; then each tensor as `tensor_type`, 32-byte aligned."""
    if tensor_type not in ADAPTER_WRITE_TYPES:
        raise ValueError(f"adapter type {tensor_type!r} is not one of {sorted(ADAPTER_WRITE_TYPES)}")
    layout_of_arch(arch)
    qtype = ADAPTER_WRITE_TYPES[tensor_type]
    kvs = [_gguf_string(key) + struct.pack("<I", GGUFValueType.STRING) + _gguf_string(value)
           for key, value in (("general.architecture", arch), ("general.type", "adapter"), ("adapter.type", "lora"))]
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


def write_adapter_gguf(path: str | os.PathLike[str], tensors: dict[str, np.ndarray], alpha: float, tensor_type: str = "q4_0",
                       arch: str = gpt2_layout.ARCH) -> Path:
    """Write `adapter_gguf_bytes(...)` to `path`, atomically."""
    data = adapter_gguf_bytes(tensors, alpha, tensor_type, arch)
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


def write_peft_dir(folder: str | os.PathLike[str], adapter: LoraAdapter, base_model_name: str | None = None) -> Path:
    """Export the PEFT form (adapter_config.json + adapter_model.safetensors) of a GPT-2 or Qwen3
    adapter, replacing the folder as a whole (see `check_peft_folder`). base_model_name defaults
    to the family's HF model id ("gpt2", "Qwen/Qwen3-0.6B")."""
    from safetensors.numpy import save_file

    layout = adapter.layout
    folder = Path(folder).expanduser()
    check_peft_folder(folder)
    with atomic_dir(folder) as tmp:
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name or layout.base_model_name,
            "r": adapter.rank, "lora_alpha": whole_number(adapter.alpha), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": layout.fan_in_fan_out, "target_modules": layout.peft_target_modules,
            "inference_mode": True,
        }
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file({layout.gguf_to_peft(n): np.ascontiguousarray(a, dtype=np.float32) for n, a in adapter.tensors().items()},
                  str(tmp / "adapter_model.safetensors"))
    return folder
