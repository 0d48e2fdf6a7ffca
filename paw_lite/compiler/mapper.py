"""The mapper (the public reimplementation avra-m3/program-as-weights-server, checked against the published lora_mapper.pt shapes) in NumPy, fp32: compiler hidden states -> LoRA A/B for every layer and
target module of the interpreter, as a learned mixture of basis matrices."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import gpt2_layout, qwen3_layout
from ..errors import IncompatibleModelError, InvalidFileError
from ..gpt2_layout import GPT2Config
from ..qwen3_layout import Qwen3Config
from ..safetensors_file import SafetensorsFile

Modules = tuple[tuple[str, str], ...]  # (GGUF module name, the mapper's key suffix), in the mapper's order


def _modules(lora_modules: dict[str, tuple[str, str]]) -> Modules:
    out = tuple((gguf_name, suffix) for gguf_name, (_, suffix) in lora_modules.items())
    assert [s for _, s in out] == sorted(s for _, s in out), "the mapper's coefficient layout is in sorted module order"
    return out


# The target modules of each interpreter, in the mapper's (sorted key-suffix) order, which lays out its
# coefficient vector: GPT-2's 4 (Compact programs), Qwen3's 7 (Standard programs).
GPT2_MODULES: Modules = _modules(gpt2_layout.LORA_MODULES)
QWEN3_MODULES: Modules = _modules(qwen3_layout.LORA_MODULES)
_MODULES_OF_CONFIG = {GPT2Config: GPT2_MODULES, Qwen3Config: QWEN3_MODULES}
InterpreterConfig = GPT2Config | Qwen3Config

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """torch's default GELU, x * Phi(x) with the exact erf; evaluated in float64 with the C library's
    erf (correct to an ulp of float64), returned as float32."""
    x64 = np.asarray(x, dtype=np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)).astype(np.float64))).astype(np.float32)


@dataclass(frozen=True)
class MapperShape:
    """What the mapper's tensors must look like, from the three files that fix it: the compiler
    (hidden width), the interpreter (layers, module widths) and the compiler meta (rank, bases).
    `modules` defaults to the interpreter's own target modules (GPT-2's 4 or Qwen3's 7)."""

    hidden: int
    interpreter: InterpreterConfig
    rank: int
    n_bases: int
    modules: Modules = ()

    def __post_init__(self):
        if not self.modules:
            object.__setattr__(self, "modules", _MODULES_OF_CONFIG[type(self.interpreter)])

    @property
    def n_coefficients(self) -> int:
        """The coefficient head's width: layers x modules x bases x (A, B)."""
        return self.interpreter.n_layer * len(self.modules) * self.n_bases * 2

    def describe(self) -> str:
        return (f"compiler width {self.hidden}, interpreter {self.interpreter.n_layer} layers x {self.interpreter.n_embd} "
                f"with {len(self.modules)} modules, rank {self.rank}, {self.n_bases} bases")

    def expected(self, trunk_width: int) -> dict[str, tuple[int, ...]]:
        n_coeff = self.n_coefficients
        shapes: dict[str, tuple[int, ...]] = {
            "trunk.0.weight": (trunk_width, self.hidden), "trunk.0.bias": (trunk_width,),
            "coeff_head.weight": (n_coeff, trunk_width), "coeff_head.bias": (n_coeff,),
        }
        for gguf_name, suffix in self.modules:
            d_in, d_out = self.interpreter.module_dims(gguf_name)
            shapes[f"A_bases_{suffix}"] = (self.n_bases, self.rank, d_in)
            shapes[f"B_bases_{suffix}"] = (self.n_bases, d_out, self.rank)
        return shapes


def key_mismatch(path: Path, shape: MapperShape, missing: list[str], unknown: list[str]) -> InvalidFileError:
    """A mapper (the .pt or its safetensors) whose keys are not the published mapper's for this shape;
    one whose bases are the other family's modules is named as such."""
    hint = ""
    for modules, family in ((GPT2_MODULES, "Compact (GPT-2, paw-4b-gpt2)"), (QWEN3_MODULES, "Standard (Qwen3-0.6B, paw-4b-qwen3-0.6b)")):
        if modules != shape.modules and any(k == f"A_bases_{suffix}" for k in unknown for _, suffix in modules):
            hint = (f". Its bases are for the modules of {family} programs: compile with that family "
                    f"(--family, family=), or pass this family's mapper")
    return InvalidFileError(f"{path}: keys are not those of the published lora_mapper.pt for this shape (rank "
                            f"{shape.rank}, {shape.n_bases} bases): missing {missing}, unexpected {unknown}{hint}")


@dataclass(frozen=True)
class Mapper:
    weights: dict[str, np.ndarray]
    shape: MapperShape
    source: str

    @classmethod
    def load(cls, path: str | os.PathLike[str], shape: MapperShape) -> "Mapper":
        """Read `mapper.safetensors` (fp32), checking every key and shape before reading data."""
        st = cls.check(path, shape)
        weights = {key: st.f32(key) for key in st.keys()}
        for key, arr in weights.items():
            if not np.isfinite(arr).all():
                raise InvalidFileError(f"{st.path}: {key} holds NaN or Inf values")
        return cls(weights, shape, str(st.path))

    @staticmethod
    def check(path: str | os.PathLike[str], shape: MapperShape) -> SafetensorsFile:
        """Validate keys, shapes and dtypes from the header alone (no tensor data is read)."""
        path = Path(path)
        st = SafetensorsFile(path)
        if "trunk.0.bias" not in st.keys() or len(st.shape("trunk.0.bias")) != 1:
            raise InvalidFileError(f"{path}: trunk.0.bias is missing or not a vector; not a PAW mapper")
        expected = shape.expected(st.shape("trunk.0.bias")[0])
        missing = sorted(set(expected) - set(st.keys()))
        unknown = sorted(set(st.keys()) - set(expected))
        if missing or unknown:
            raise key_mismatch(path, shape, missing, unknown)
        for key, want in expected.items():
            if st.shape(key) != want:
                raise IncompatibleModelError(f"{path}: {key} has shape {st.shape(key)}, expected {want} ({shape.describe()})")
            if st.dtype_name(key) != "F32":
                raise InvalidFileError(f"{path}: {key} is {st.dtype_name(key)}; the mapper runs in fp32 and is stored as F32")
        return st

    def __call__(self, hidden_states: np.ndarray) -> dict[str, np.ndarray]:
        """hidden_states (n_interpreter_layers, n_positions, hidden) -> GGUF-named LoRA tensors
        `blk.{l}.{module}.weight.lora_a` (r, d_in) and `.lora_b` (d_out, r)."""
        w, cfg = self.weights, self.shape
        n_layer = cfg.interpreter.n_layer
        if hidden_states.ndim != 3 or hidden_states.shape[0] != n_layer or hidden_states.shape[2] != cfg.hidden:
            raise ValueError(f"hidden states have shape {hidden_states.shape}, expected ({n_layer}, positions, {cfg.hidden})")
        h = hidden_states.astype(np.float32).mean(axis=0).mean(axis=0)  # (hidden,)
        z = gelu_erf(w["trunk.0.weight"] @ h + w["trunk.0.bias"])  # (trunk,)
        c = (w["coeff_head.weight"] @ z + w["coeff_head.bias"]).reshape(n_layer, len(cfg.modules), cfg.n_bases, 2)
        out: dict[str, np.ndarray] = {}
        per_module = {}
        for m, (gguf_name, suffix) in enumerate(cfg.modules):
            a_bases, b_bases = w[f"A_bases_{suffix}"], w[f"B_bases_{suffix}"]  # (N, r, d_in), (N, d_out, r)
            a = (c[:, m, :, 0] @ a_bases.reshape(cfg.n_bases, -1)).reshape(n_layer, *a_bases.shape[1:])  # (L, r, d_in)
            b = (c[:, m, :, 1] @ b_bases.reshape(cfg.n_bases, -1)).reshape(n_layer, *b_bases.shape[1:])  # (L, d_out, r)
            per_module[gguf_name] = (a, b)
        for layer in range(n_layer):
            for gguf_name, _ in cfg.modules:
                a, b = per_module[gguf_name]
                out[f"blk.{layer}.{gguf_name}.weight.lora_a"] = np.ascontiguousarray(a[layer])
                out[f"blk.{layer}.{gguf_name}.weight.lora_b"] = np.ascontiguousarray(b[layer])
        return out
