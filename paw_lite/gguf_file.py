"""Reading GGUF files safely: header checks before gguf-py maps anything, typed field access,
tensors dequantized to float32 in NumPy order (rows, cols)."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, quants

from .errors import InvalidFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Smallest possible encodings, used to bound counts by the file size before parsing:
# tensor info = name length (8) + 1 name byte + n_dims (4) + one dim (8) + type (4) + offset (8).
_MIN_TENSOR_INFO_BYTES = 33
# key/value = key length (8) + 1 key byte + value type (4) + 1 value byte.
_MIN_KV_BYTES = 14
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_DIM = 1 << 32

# The parse errors gguf-py and NumPy raise on malformed files; anything else is a bug.
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, UnicodeDecodeError, EOFError)


def check_header(path: Path) -> tuple[int, int, int]:
    """Validate magic, version and counts against the file size. Returns (version, n_tensors, n_kv)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise InvalidFileError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(head) < 24:
        raise InvalidFileError(f"{path}: {size} bytes is too short for a GGUF header (24 bytes)")
    if head[:4] != GGUF_MAGIC:
        raise InvalidFileError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in SUPPORTED_VERSIONS:
        raise InvalidFileError(f"{path}: GGUF version {version} is not supported (expected one of {SUPPORTED_VERSIONS})")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise InvalidFileError(f"{path}: header declares {n_tensors} tensors and {n_kv} keys; at most {MAX_TENSORS} of each are accepted")
    if 24 + n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > size:
        raise InvalidFileError(f"{path}: header declares {n_tensors} tensors and {n_kv} keys, more than a {size}-byte file can hold (truncated?)")
    return version, n_tensors, n_kv


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """Open a GGUF file with gguf-py after checking its header; every parse failure becomes InvalidFileError."""
    path = Path(path)
    check_header(path)
    try:
        reader = GGUFReader(path)
    except _PARSE_ERRORS as exc:
        raise InvalidFileError(f"{path}: malformed GGUF: {exc}") from exc
    data_end = os.path.getsize(path)
    for t in reader.tensors:
        if any(int(d) == 0 or int(d) > MAX_DIM for d in t.shape):
            raise InvalidFileError(f"{path}: tensor {t.name} has dimensions {list(map(int, t.shape))}")
        if t.data_offset + t.n_bytes > data_end or t.data.nbytes != t.n_bytes:
            raise InvalidFileError(f"{path}: tensor {t.name} runs past the end of the file (truncated?)")
    return reader


_MISSING = object()


def get_field(reader: GGUFReader, key: str, path: Path, default: Any = _MISSING) -> Any:
    """The value of a metadata key (scalar, string or list); missing keys raise unless a default is given."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise InvalidFileError(f"{path}: metadata key {key!r} is missing")
        return default
    try:
        return field.contents()
    except _PARSE_ERRORS as exc:
        raise InvalidFileError(f"{path}: metadata key {key!r} cannot be read: {exc}") from exc


def get_int(reader: GGUFReader, key: str, path: Path, default: Any = _MISSING) -> int:
    value = get_field(reader, key, path, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidFileError(f"{path}: metadata key {key!r} is {value!r}, expected an integer")
    return int(value)


def get_float(reader: GGUFReader, key: str, path: Path, default: Any = _MISSING) -> float:
    value = get_field(reader, key, path, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise InvalidFileError(f"{path}: metadata key {key!r} is {value!r}, expected a number")
    return float(value)


def get_str(reader: GGUFReader, key: str, path: Path, default: Any = _MISSING) -> str:
    value = get_field(reader, key, path, default)
    if not isinstance(value, str):
        raise InvalidFileError(f"{path}: metadata key {key!r} is {value!r}, expected a string")
    return value


def numpy_shape(tensor: Any) -> tuple[int, ...]:
    """GGUF lists dimensions fastest-first (ne); NumPy wants them slowest-first."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def tensor_to_f32(tensor: Any, path: Path, allowed: frozenset[GGMLQuantizationType]) -> np.ndarray:
    """Dequantize one tensor to a float32 array of its NumPy shape (a fresh array, never a view of the file)."""
    qtype = tensor.tensor_type
    if qtype not in allowed:
        names = ", ".join(sorted(t.name for t in allowed))
        raise InvalidFileError(f"{path}: tensor {tensor.name} has type {qtype.name}; supported here: {names}")
    try:
        values = quants.dequantize(tensor.data, qtype)
        out = np.array(values, dtype=np.float32, copy=True).reshape(numpy_shape(tensor))
    except (*_PARSE_ERRORS, quants.QuantError) as exc:
        raise InvalidFileError(f"{path}: tensor {tensor.name} cannot be decoded: {exc}") from exc
    if not np.isfinite(out).all():
        raise InvalidFileError(f"{path}: tensor {tensor.name} holds NaN or Inf values")
    return out


WEIGHT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0})
ADAPTER_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0})
