"""Reading GGUF files safely: the whole header walked and bounds-checked before gguf-py parses
anything (gguf-py trusts every count, length and offset it reads), typed field access, tensors
dequantized to float32 in NumPy order (rows, cols)."""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFReader, GGUFValueType, quants

from .errors import InvalidFileError, regular_file_size

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Smallest possible encodings, used to bound counts by the file size before parsing:
# tensor info = name length (8) + 1 name byte + n_dims (4) + one dim (8) + type (4) + offset (8).
_MIN_TENSOR_INFO_BYTES = 33
# key/value = key length (8) + 1 key byte + value type (4) + 1 value byte.
_MIN_KV_BYTES = 14
# What llama.cpp's own reader accepts (ggml.h: GGML_MAX_DIMS, GGML_MAX_NAME including the NUL).
MAX_DIMS = 4
MAX_TENSOR_NAME_BYTES = 63
MAX_KEY_BYTES = 65535
MAX_DIM = 1 << 32  # no real tensor comes near; larger values only serve overflow tricks
_U64 = struct.Struct("<Q")
_SCALAR_BYTES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}

# The parse errors gguf-py and NumPy raise on malformed files; anything else is a bug.
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, UnicodeDecodeError, EOFError)


@dataclass(frozen=True)
class GGUFLimits:
    """How much header a file may declare before gguf-py parses it. gguf-py spends about 1 KB of
    memory and 20 microseconds per metadata array item, so the items are counted first."""

    max_tensors: int
    max_kv: int
    max_array_items: int  # summed over every metadata array
    max_string_bytes: int  # one string value


# Models carry their tokenizer: Qwen's 151,936 tokens + merges + types are ~455k array items.
MODEL_LIMITS = GGUFLimits(max_tensors=1 << 16, max_kv=1 << 16, max_array_items=1 << 20, max_string_bytes=1 << 24)
# An adapter has a handful of keys and no arrays; 96 tensors for GPT-2 124M.
ADAPTER_LIMITS = GGUFLimits(max_tensors=1 << 12, max_kv=256, max_array_items=1 << 12, max_string_bytes=1 << 16)
MAX_TENSORS, MAX_KV = MODEL_LIMITS.max_tensors, MODEL_LIMITS.max_kv


def check_header(path: str | os.PathLike[str], limits: GGUFLimits = MODEL_LIMITS) -> tuple[int, int, int]:
    """Check magic, version and the declared counts against the limits and the file size (reads 24
    bytes). Returns (version, n_tensors, n_kv)."""
    path = Path(path)
    try:
        regular_file_size(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(24)
    except OSError as exc:
        raise InvalidFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(head) < 24:
        raise InvalidFileError(f"{path}: {size} bytes is too short for a GGUF header (24 bytes)")
    return _check_counts(path, head, size, limits)


def check_structure(path: str | os.PathLike[str], limits: GGUFLimits = MODEL_LIMITS) -> None:
    """check_header, then a bounds-checked walk over every key/value and tensor record: value types,
    string and array lengths, dimensions, tensor types, and that every tensor's data lies inside
    the file. Reads fixed-size fields only; allocates a few bytes per record."""
    path = Path(path)
    _, n_tensors, n_kv = check_header(path, limits)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _HeaderWalk(path, buf, limits).walk(n_tensors, n_kv)
    except OSError as exc:
        raise InvalidFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _check_counts(path: Path, head: bytes, size: int, limits: GGUFLimits) -> tuple[int, int, int]:
    if head[:4] != GGUF_MAGIC:
        raise InvalidFileError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in SUPPORTED_VERSIONS:
        if struct.unpack(">I", head[4:8])[0] in SUPPORTED_VERSIONS:
            raise InvalidFileError(f"{path}: a big-endian GGUF file; only little-endian files are supported")
        raise InvalidFileError(f"{path}: GGUF version {version} is not supported (expected one of {SUPPORTED_VERSIONS})")
    if n_tensors > limits.max_tensors or n_kv > limits.max_kv:
        raise InvalidFileError(f"{path}: header declares {n_tensors} tensors and {n_kv} keys; at most "
                               f"{limits.max_tensors} tensors and {limits.max_kv} keys are accepted here")
    if 24 + n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > size:
        raise InvalidFileError(f"{path}: header declares {n_tensors} tensors and {n_kv} keys, more than a {size}-byte file can hold (truncated?)")
    return version, n_tensors, n_kv


class _HeaderWalk:
    """A bounds-checked pass over the key/value and tensor-info tables, reading fixed-size fields
    only, so that gguf-py (which trusts every count and length) is only handed sane files."""

    def __init__(self, path: Path, buf: mmap.mmap, limits: GGUFLimits):
        self.path, self.buf, self.limits = path, buf, limits
        self.pos, self.size = 24, len(buf)
        self.array_items = 0
        self.alignment = GGUF_DEFAULT_ALIGNMENT

    def fail(self, what: str) -> InvalidFileError:
        return InvalidFileError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes, past the end of the {self.size}-byte file (truncated?)")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, max_bytes: int) -> int:
        """Skip a string, checking its length; returns where its bytes start."""
        n = self.unpack("<Q", f"length of {what}")
        if n > max_bytes:
            raise self.fail(f"{what} at byte {self.pos - 8} is {n} bytes long; at most {max_bytes} are accepted")
        return self.take(n, what)

    def name(self, what: str, max_bytes: int) -> str:
        start = self.string(what, max_bytes)
        raw = self.buf[start:self.pos]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {start} is not valid UTF-8: {raw[:40]!r}") from None

    def walk(self, n_tensors: int, n_kv: int) -> None:
        keys: set[str] = set()
        for i in range(n_kv):
            key = self.name(f"key #{i}", MAX_KEY_BYTES)
            if key in keys:
                raise self.fail(f"metadata key {key!r} appears twice")
            keys.add(key)
            self.value(key)
        names: set[str] = set()
        tensors = [self.tensor_info(i, names) for i in range(n_tensors)]
        data_start = -(-self.pos // self.alignment) * self.alignment
        for name, ne, qtype, offset in tensors:
            self.check_tensor_data(name, ne, qtype, offset, data_start)

    def value(self, key: str) -> None:
        vtype = self.value_type(key, self.unpack("<I", f"type of {key!r}"))
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                raise self.fail(f"general.alignment has type {vtype.name}, expected UINT32")
            align = self.unpack("<I", key)
            if align == 0 or align & (align - 1):
                raise self.fail(f"general.alignment is {align}, expected a power of two")
            self.alignment = align
        elif vtype == GGUFValueType.STRING:
            self.string(f"value of {key!r}", self.limits.max_string_bytes)
        elif vtype == GGUFValueType.ARRAY:
            itype = self.value_type(key, self.unpack("<I", f"item type of {key!r}"))
            n = self.unpack("<Q", f"length of {key!r}")
            if itype == GGUFValueType.ARRAY:
                raise self.fail(f"metadata key {key!r} is an array of arrays, which paw_lite does not accept")
            self.array_items += n
            if self.array_items > self.limits.max_array_items:
                raise self.fail(f"metadata arrays hold more than {self.limits.max_array_items} items in all "
                                f"({key!r} declares {n}); refusing to parse")
            if itype == GGUFValueType.STRING:
                self.strings(key, n)
            else:
                self.take(n * _SCALAR_BYTES[itype], f"the {n} items of {key!r}")
        else:
            self.take(_SCALAR_BYTES[vtype], f"value of {key!r}")

    def strings(self, key: str, n: int) -> None:
        """Skip an array of n strings (a vocabulary: the hot loop of the walk, kept bare)."""
        if n * 8 > self.size - self.pos:
            raise self.fail(f"{key!r} declares {n} strings, more than the rest of the file can hold (truncated?)")
        unpack_from, buf, pos, size, max_bytes = _U64.unpack_from, self.buf, self.pos, self.size, self.limits.max_string_bytes
        for j in range(n):
            if pos + 8 > size:
                break
            (length,) = unpack_from(buf, pos)
            pos += 8 + length
            if length > max_bytes or pos > size:
                break
        else:
            self.pos = pos
            return
        raise self.fail(f"item {j} of {key!r} is truncated or longer than {max_bytes} bytes")

    def value_type(self, key: str, raw: int) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"metadata key {key!r} has unknown value type {raw}") from None

    def tensor_info(self, i: int, names: set[str]) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self.name(f"name of tensor #{i}", MAX_TENSOR_NAME_BYTES)
        if not name or name in names:
            raise self.fail(f"tensor #{i} has {'an empty' if not name else 'a duplicate'} name {name!r}")
        names.add(name)
        n_dims = self.unpack("<I", f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.fail(f"tensor {name} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
        ne = struct.unpack_from(f"<{n_dims}Q", self.buf, self.take(8 * n_dims, f"dimensions of {name}"))
        raw_type = self.unpack("<I", f"type of {name}")
        offset = self.unpack("<Q", f"data offset of {name}")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise self.fail(f"tensor {name} has unknown type {raw_type}") from None
        return name, ne, qtype, offset

    def check_tensor_data(self, name: str, ne: tuple[int, ...], qtype: GGMLQuantizationType, offset: int, data_start: int) -> None:
        if any(d == 0 or d > MAX_DIM for d in ne):
            raise self.fail(f"tensor {name} has dimensions {list(ne)}")
        block, type_bytes = GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            raise self.fail(f"tensor {name} has rows of {ne[0]} values, not a multiple of the {qtype.name} block of {block}")
        n_bytes = math.prod(ne) // block * type_bytes
        if offset % self.alignment:
            raise self.fail(f"tensor {name} data offset {offset} is not a multiple of the alignment {self.alignment}")
        if data_start + offset + n_bytes > self.size:
            raise self.fail(f"tensor {name} ({qtype.name}, {list(ne)}) needs bytes {data_start + offset}..{data_start + offset + n_bytes} "
                            f"but the file has {self.size} (truncated, or absurd dimensions)")


def open_gguf(path: str | os.PathLike[str], limits: GGUFLimits = MODEL_LIMITS) -> GGUFReader:
    """Open a GGUF file with gguf-py after checking its whole header; every parse failure becomes InvalidFileError."""
    path = Path(path)
    check_structure(path, limits)
    try:
        reader = GGUFReader(path)
    except _PARSE_ERRORS as exc:
        raise InvalidFileError(f"{path}: malformed GGUF: {exc}") from exc
    for t in reader.tensors:  # check_header proved this; a disagreement with gguf-py is refused, not trusted
        if t.data.nbytes != t.n_bytes:
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
    from .gguf_fast import dequantize as _fast_dequantize  # imported here: gguf_fast imports this module

    qtype = tensor.tensor_type
    if qtype not in allowed:
        names = ", ".join(sorted(t.name for t in allowed))
        raise InvalidFileError(f"{path}: tensor {tensor.name} has type {qtype.name}; supported here: {names}")
    try:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf are refused just below
            values = _fast_dequantize(tensor.data, qtype, numpy_shape(tensor))  # gguf-py's bits, 3-10x faster
        out = np.array(values, dtype=np.float32, copy=True).reshape(numpy_shape(tensor))
    except (*_PARSE_ERRORS, quants.QuantError) as exc:
        raise InvalidFileError(f"{path}: tensor {tensor.name} cannot be decoded: {exc}") from exc
    if not np.isfinite(out).all():
        raise InvalidFileError(f"{path}: tensor {tensor.name} holds NaN or Inf values")
    return out


WEIGHT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0})
ADAPTER_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0})
