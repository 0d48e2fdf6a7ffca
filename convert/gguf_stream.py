"""Writing a GGUF file one tensor at a time, so a converter never holds the whole model.

gguf-py's `GGUFWriter.add_tensor` keeps every array until the end. Here every tensor is declared
first (name, shape, type, byte size: all known from the source headers), then the header is
written, then each tensor is encoded from its source in row chunks and written before the next
one is read. Peak memory is one encoded tensor plus one chunk."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

from paw_lite.errors import InvalidFileError
from paw_lite.safetensors_file import bf16_to_f32

# Types gguf-py can encode in NumPy; the K-quants go through llama.cpp (llama_quantize.py).
NUMPY_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                         GGMLQuantizationType.Q8_0})
CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32 per chunk
_F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its GGUF name and type, NumPy shape, and how to read its source."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    read_rows: Callable[[int, int], tuple[np.ndarray, str]]  # (row0, row1) -> (raw rows, safetensors dtype name)

    @property
    def nbytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * type_size


def check_type_fits(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> None:
    block, _ = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise InvalidFileError(f"{name}: row length {shape[-1]} is not a multiple of {block}, required by {qtype.name}")


def _to_f32(raw: np.ndarray, dtype_name: str) -> np.ndarray:
    return bf16_to_f32(raw) if dtype_name == "BF16" else raw.astype(np.float32)


def _encode_rows(plan: TensorPlan, raw: np.ndarray, dtype_name: str) -> np.ndarray:
    """Encode source rows into plan.qtype (bytes for block types, the element dtype otherwise)."""
    if plan.qtype == GGMLQuantizationType.BF16 and dtype_name == "BF16":
        if ((raw & 0x7F80) == 0x7F80).any():  # all exponent bits set: Inf or NaN, refused as for other types
            raise InvalidFileError(f"{plan.name}: the source tensor holds NaN or Inf values")
        return raw  # bf16 stays bit-identical
    if plan.qtype == GGMLQuantizationType.F16 and dtype_name == "F16":
        if not np.isfinite(raw).all():
            raise InvalidFileError(f"{plan.name}: the source tensor holds NaN or Inf values")
        return raw
    x = _to_f32(raw, dtype_name)
    if not np.isfinite(x).all():
        raise InvalidFileError(f"{plan.name}: the source tensor holds NaN or Inf values")
    if plan.qtype == GGMLQuantizationType.F32:
        return x
    if plan.qtype == GGMLQuantizationType.F16:
        if np.abs(x).max(initial=0.0) > _F16_MAX:
            raise InvalidFileError(f"{plan.name}: values exceed the float16 range ({_F16_MAX:g}); convert to bf16 or f32")
        return x.astype(np.float16)
    return quants.quantize(x, plan.qtype)


def encode_tensor(plan: TensorPlan) -> np.ndarray:
    """The whole encoded tensor, built chunk by chunk from the source rows."""
    rows = math.prod(plan.shape[:-1]) if len(plan.shape) > 1 else 1
    cols = plan.shape[-1]
    out = np.empty(plan.nbytes, dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    pos = 0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        raw, dtype_name = plan.read_rows(r0, r1)
        enc = np.ascontiguousarray(_encode_rows(plan, raw.reshape(r1 - r0, cols), dtype_name))
        n = enc.nbytes
        out[pos:pos + n] = enc.reshape(-1).view(np.uint8)
        pos += n
    assert pos == plan.nbytes, (plan.name, pos, plan.nbytes)
    return out


def write_streamed(writer: GGUFWriter, plans: list[TensorPlan], on_tensor: Callable[[str], None] | None = None) -> None:
    """Declare every tensor, write header, metadata and tensor infos, then each tensor in turn.

    The caller has added the metadata to `writer` and closes it afterwards."""
    for plan in plans:
        if plan.qtype not in NUMPY_TYPES:
            raise ValueError(f"{plan.qtype.name} cannot be written from NumPy")
        if plan.qtype != GGMLQuantizationType.F32:
            check_type_fits(plan.name, plan.shape, plan.qtype)
        writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for plan in plans:
        writer.write_tensor_data(encode_tensor(plan))
        if on_tensor:
            on_tensor(plan.name)
