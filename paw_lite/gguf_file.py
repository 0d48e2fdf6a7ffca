"""Reading GGUF files: one bounded walk over the header, used for every GGUF paw_lite reads
(interpreter models, a program's adapter.gguf straight from its bytes, the converter's checks,
and each file before llama.cpp opens it).

The walk reads the key/value and tensor-info tables once, checking every count, length and
offset against the limits and against the bytes left in the file *before* allocating for them
(gguf-py's GGUFReader trusts them, and builds NumPy views of every string: ~2 s for a GPT-2
vocabulary). Tensor data is dequantized with a few vectorised NumPy passes, bit-identical to
`gguf.quants.dequantize` and 3-10x faster (tests/test_fast_load.py checks every supported type)."""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, quants

from .errors import InvalidFileError, regular_file_size

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
ALIGNMENT_KEY = "general.alignment"
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
_SCALARS = {  # value type -> struct format
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES = {  # numeric array item type -> NumPy dtype, to read a whole array at once
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class GGUFLimits:
    """How much header a file may declare before it is parsed."""

    max_tensors: int
    max_kv: int
    max_array_items: int  # summed over every metadata array
    max_string_bytes: int  # one string value


# Models carry their tokenizer: Qwen's 151,936 tokens + merges + types are ~455k array items.
MODEL_LIMITS = GGUFLimits(max_tensors=1 << 16, max_kv=1 << 16, max_array_items=1 << 20, max_string_bytes=1 << 24)
# An adapter has a handful of keys and no arrays; 96 tensors for GPT-2 124M.
ADAPTER_LIMITS = GGUFLimits(max_tensors=1 << 12, max_kv=256, max_array_items=1 << 12, max_string_bytes=1 << 16)

WEIGHT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0})
ADAPTER_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0})


@dataclass(frozen=True)
class Field:
    """A metadata value, decoded: str, int, float, bool, or a list of one of them."""

    value: Any


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: np.ndarray  # GGUF order (ne: fastest dimension first)
    tensor_type: GGMLQuantizationType
    data_offset: int  # absolute, in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class GGUFIndex:
    """A checked GGUF header: metadata by key and the tensor table. `path` names the file in errors
    (for one read from memory, e.g. "prog.paw: adapter.gguf"); `data` holds such a file's bytes."""

    path: Path | str
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    data: bytes | None = field(default=None, repr=False)


def read_index(path: str | os.PathLike[str], limits: GGUFLimits = MODEL_LIMITS) -> GGUFIndex:
    """Read and check a GGUF file's header (every tensor lies inside the file); no tensor data is read."""
    path = Path(path)
    try:
        regular_file_size(path)  # a FIFO or a device would block or never end
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise InvalidFileError(f"{path}: {size} bytes is too short for a GGUF header (24 bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _Walk(path, buf, limits).index()
    except OSError as exc:
        raise InvalidFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def read_index_bytes(data: bytes, source: str, limits: GGUFLimits = MODEL_LIMITS) -> GGUFIndex:
    """read_index for a GGUF file held in memory (a program's adapter.gguf); errors name `source`."""
    if len(data) < 24:
        raise InvalidFileError(f"{source}: {len(data)} bytes is too short for a GGUF header (24 bytes)")
    index = _Walk(source, data, limits).index()
    return GGUFIndex(index.path, index.fields, index.tensors, index.data_offset, index.file_size, data)


class _Walk:
    """The key/value and tensor-info tables of `buf` (a memory map or bytes): one checking pass over
    every record, then the values decoded. Every length is checked against the bytes left before
    anything is read or allocated for it."""

    def __init__(self, source: Path | str, buf: mmap.mmap | bytes, limits: GGUFLimits):
        self.source, self.buf, self.limits = source, buf, limits
        self.pos, self.size = 24, len(buf)
        self.array_items = 0

    def fail(self, what: str) -> InvalidFileError:
        return InvalidFileError(f"{self.source}: {what}")

    def take(self, n: int, what: str) -> int:
        """Skip n bytes; returns where they start."""
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes, past the end of the {self.size}-byte file (truncated?)")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def text(self, what: str, max_bytes: int, decode: bool = True) -> str | None:
        n = self.unpack("<Q", f"length of {what}")
        if n > max_bytes:
            raise self.fail(f"{what} at byte {self.pos - 8} is {n} bytes long; at most {max_bytes} are accepted")
        start = self.take(n, what)
        if not decode:
            return None
        raw = self.buf[start:self.pos]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {start} is not valid UTF-8: {raw[:40]!r}") from None

    def index(self) -> GGUFIndex:
        n_tensors, n_kv = self.counts()
        # First every record is checked, skipping the values (nothing allocated for them), then the
        # values are decoded: a huge count late in the file is refused before a vocabulary is read.
        starts: dict[str, int] = {}
        for i in range(n_kv):
            key = self.text(f"key #{i}", MAX_KEY_BYTES)
            if key in starts:
                raise self.fail(f"metadata key {key!r} appears twice")
            starts[key] = self.pos
            self.value(key, decode=False)
        names: set[str] = set()
        records = [self.tensor_info(i, names) for i in range(n_tensors)]
        end_of_header = self.pos
        self.array_items = 0
        fields: dict[str, Field] = {}
        for key, start in starts.items():
            self.pos = start
            fields[key] = Field(self.value(key, decode=True))
        alignment = fields[ALIGNMENT_KEY].value if ALIGNMENT_KEY in fields else GGUF_DEFAULT_ALIGNMENT
        if alignment == 0 or alignment & (alignment - 1):
            raise self.fail(f"{ALIGNMENT_KEY} is {alignment}, expected a power of two")
        data_start = -(-end_of_header // alignment) * alignment
        tensors = [self.tensor(*record, data_start, alignment) for record in records]
        end = data_start
        for t in sorted(tensors, key=lambda t: t.data_offset):  # tensor data may not overlap
            if t.data_offset < end:
                raise self.fail(f"tensor {t.name} overlaps the tensor before it")
            end = t.data_offset + t.n_bytes
        return GGUFIndex(self.source, fields, tensors, data_start, self.size)

    def counts(self) -> tuple[int, int]:
        """Magic, version and the declared counts, checked against the limits and the file size."""
        magic = bytes(self.buf[:4])
        if magic != GGUF_MAGIC:
            raise self.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", self.buf, 4)
        if version not in SUPPORTED_VERSIONS:
            if struct.unpack_from(">I", self.buf, 4)[0] in SUPPORTED_VERSIONS:
                raise self.fail("a big-endian GGUF file; only little-endian files are supported")
            raise self.fail(f"GGUF version {version} is not supported (expected one of {SUPPORTED_VERSIONS})")
        limits = self.limits
        if n_tensors > limits.max_tensors or n_kv > limits.max_kv:
            raise self.fail(f"header declares {n_tensors} tensors and {n_kv} keys; at most "
                            f"{limits.max_tensors} tensors and {limits.max_kv} keys are accepted here")
        if 24 + n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > self.size:
            raise self.fail(f"header declares {n_tensors} tensors and {n_kv} keys, more than a {self.size}-byte "
                            f"file can hold (truncated?)")
        return n_tensors, n_kv

    def value(self, key: str, decode: bool) -> Any:
        """The value at self.pos, decoded, or (decode False) checked and skipped."""
        vtype = self.value_type(key, self.unpack("<I", f"type of {key!r}"))
        if key == ALIGNMENT_KEY and vtype != GGUFValueType.UINT32:
            # The GGUF specification's type; llama.cpp's gguf.cpp and gguf-py refuse any other.
            raise self.fail(f"{ALIGNMENT_KEY} has type {vtype.name}, expected UINT32 (the type the GGUF specification, "
                            f"llama.cpp and gguf-py use); rewrite the file with gguf-py's GGUFWriter")
        if vtype == GGUFValueType.STRING:
            return self.text(f"value of {key!r}", self.limits.max_string_bytes, decode)
        if vtype != GGUFValueType.ARRAY:
            return self.unpack(_SCALARS[vtype], f"value of {key!r}")
        itype = self.value_type(key, self.unpack("<I", f"item type of {key!r}"))
        n = self.unpack("<Q", f"length of {key!r}")
        if itype == GGUFValueType.ARRAY:
            raise self.fail(f"metadata key {key!r} is an array of arrays, which paw_lite does not accept")
        self.array_items += n
        if self.array_items > self.limits.max_array_items:
            raise self.fail(f"metadata arrays hold more than {self.limits.max_array_items} items in all "
                            f"({key!r} declares {n}); refusing to parse")
        if itype == GGUFValueType.STRING:
            return self.strings(key, n) if decode else self.skip_strings(key, n)
        dtype = np.dtype(_ARRAY_DTYPES[itype])
        start = self.take(n * dtype.itemsize, f"the {n} items of {key!r}")
        return np.frombuffer(self.buf, dtype, count=n, offset=start).tolist() if decode else None

    def skip_strings(self, key: str, n: int) -> None:
        """Check an array of n strings without decoding them."""
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

    def strings(self, key: str, n: int) -> list[str]:
        """An array of n strings (a vocabulary: the hot loop of a model's load, kept bare)."""
        if n * 8 > self.size - self.pos:
            raise self.fail(f"{key!r} declares {n} strings, more than the rest of the file can hold (truncated?)")
        out: list[str] = []
        append, unpack_from, buf, pos, size = out.append, _U64.unpack_from, self.buf, self.pos, self.size
        max_bytes = self.limits.max_string_bytes
        try:
            for j in range(n):
                if pos + 8 > size:
                    break
                (length,) = unpack_from(buf, pos)
                pos += 8
                if length > max_bytes or pos + length > size:
                    break
                append(buf[pos:pos + length].decode("utf-8"))
                pos += length
            else:
                self.pos = pos
                return out
        except UnicodeDecodeError as exc:
            raise self.fail(f"item {j} of {key!r} is not valid UTF-8 ({exc.reason})") from None
        raise self.fail(f"item {j} of {key!r} at byte {pos} is truncated or longer than {max_bytes} bytes")

    def value_type(self, key: str, raw: int) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"metadata key {key!r} has unknown value type {raw}") from None

    def tensor_info(self, i: int, names: set[str]) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self.text(f"name of tensor #{i}", MAX_TENSOR_NAME_BYTES)
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
            qtype = None
        if qtype not in GGML_QUANT_SIZES:
            raise self.fail(f"tensor {name} has unknown type {raw_type}")
        return name, ne, qtype, offset

    def tensor(self, name: str, ne: tuple[int, ...], qtype: GGMLQuantizationType, offset: int, data_start: int,
               alignment: int) -> TensorInfo:
        if any(d == 0 or d > MAX_DIM for d in ne):
            raise self.fail(f"tensor {name} has dimensions {list(ne)}")
        block, type_bytes = GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            raise self.fail(f"tensor {name} has rows of {ne[0]} values, not a multiple of the {qtype.name} block of {block}")
        n_bytes = math.prod(ne) // block * type_bytes
        if offset % alignment:
            raise self.fail(f"tensor {name} data offset {offset} is not a multiple of the alignment {alignment}")
        start = data_start + offset
        if start + n_bytes > self.size:
            raise self.fail(f"tensor {name} ({qtype.name}, {list(ne)}) needs bytes {start}..{start + n_bytes} "
                            f"but the file has {self.size} (truncated, or absurd dimensions)")
        return TensorInfo(name, np.array(ne, np.uint64), qtype, start, n_bytes)


# -- metadata ------------------------------------------------------------------------------------

_MISSING = object()


def get_field(index: GGUFIndex, key: str, path: Path | str, default: Any = _MISSING) -> Any:
    """The value of a metadata key (scalar, string or list); missing keys raise unless a default is given."""
    found = index.fields.get(key)
    if found is None:
        if default is _MISSING:
            raise InvalidFileError(f"{path}: metadata key {key!r} is missing")
        return default
    return found.value


def get_int(index: GGUFIndex, key: str, path: Path | str, default: Any = _MISSING) -> int:
    value = get_field(index, key, path, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidFileError(f"{path}: metadata key {key!r} is {value!r}, expected an integer")
    return value


def get_float(index: GGUFIndex, key: str, path: Path | str, default: Any = _MISSING) -> float:
    value = get_field(index, key, path, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidFileError(f"{path}: metadata key {key!r} is {value!r}, expected a number")
    return float(value)


def get_str(index: GGUFIndex, key: str, path: Path | str, default: Any = _MISSING) -> str:
    value = get_field(index, key, path, default)
    if not isinstance(value, str):
        raise InvalidFileError(f"{path}: metadata key {key!r} is {value!r}, expected a string")
    return value


# -- tensor data ---------------------------------------------------------------------------------

def numpy_shape(tensor: TensorInfo) -> tuple[int, ...]:
    """GGUF lists dimensions fastest-first (ne); NumPy wants them slowest-first."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def iter_tensors(index: GGUFIndex, tensors: list[TensorInfo] | None = None) -> Iterator[tuple[TensorInfo, bytes | memoryview]]:
    """(info, raw bytes) of every tensor (or of `tensors`, a part of the index's), in file order
    (read_index checked they lie inside the file and do not overlap)."""
    chosen = sorted(index.tensors if tensors is None else tensors, key=lambda t: t.data_offset)
    if index.data is not None:
        view = memoryview(index.data)
        for info in chosen:
            yield info, view[info.data_offset:info.data_offset + info.n_bytes]
        return
    with open(index.path, "rb") as f:
        for info in chosen:
            f.seek(info.data_offset)
            raw = f.read(info.n_bytes)
            if len(raw) != info.n_bytes:  # the file shrank since read_index
                raise InvalidFileError(f"{index.path}: tensor {info.name} runs past the end of the file (truncated?)")
            yield info, raw


def tensor_to_f32(info: TensorInfo, raw: bytes | memoryview, path: Path | str,
                  allowed: frozenset[GGMLQuantizationType]) -> np.ndarray:
    """A tensor as a fresh float32 array of its NumPy shape; a type outside `allowed`, or NaN/Inf
    values, are refused."""
    qtype = info.tensor_type
    if qtype not in allowed:
        names = ", ".join(sorted(t.name for t in allowed))
        raise InvalidFileError(f"{path}: tensor {info.name} has type {qtype.name}; supported here: {names}")
    try:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf are refused just below
            out = dequantize(raw, qtype, numpy_shape(info))
    except (ValueError, quants.QuantError) as exc:
        raise InvalidFileError(f"{path}: tensor {info.name} cannot be decoded: {exc}") from exc
    # A Q8_0 or Q4_0 value is a small integer times its block's float16 scale: finite exactly
    # when every scale is (checking the scales reads 1/16 of the values).
    finite = _block_scales(raw, qtype) if qtype in _BLOCK_BYTES else out
    if not np.isfinite(finite).all():
        raise InvalidFileError(f"{path}: tensor {info.name} holds NaN or Inf values")
    return out


_BLOCK_BYTES = {GGMLQuantizationType.Q8_0: 34, GGMLQuantizationType.Q4_0: 18}  # float16 scale + 32 values


def _block_scales(raw: bytes | memoryview, qtype: GGMLQuantizationType) -> np.ndarray:
    return np.frombuffer(raw, np.uint8).reshape(-1, _BLOCK_BYTES[qtype])[:, :2].copy().view("<f2")


def dequantize(raw: bytes | bytearray | memoryview, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of `shape` from a tensor's raw bytes; bit-identical to gguf.quants.dequantize."""
    data = np.frombuffer(raw, np.uint8)
    if qtype == GGMLQuantizationType.F32:
        return data.view("<f4").reshape(shape).copy()
    if qtype == GGMLQuantizationType.F16:
        return data.view("<f2").astype(np.float32).reshape(shape)
    if qtype == GGMLQuantizationType.BF16:
        return (data.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if qtype == GGMLQuantizationType.Q8_0:
        blocks = data.reshape(-1, 34)  # float16 scale d, then 32 int8 values q: x = q * d
        scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
        out = np.empty((len(blocks), 32), np.float32)
        np.multiply(blocks[:, 2:].view(np.int8), scale, out=out)  # int8 -> float32 exactly, in the same pass
        return out.reshape(shape)
    if qtype == GGMLQuantizationType.Q4_0:
        blocks = data.reshape(-1, 18)  # float16 scale d, then 16 bytes: low nibbles are values 0..15,
        scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # high nibbles 16..31; x = (q - 8) * d
        packed = blocks[:, 2:]
        q = np.empty((len(blocks), 32), np.int8)
        np.bitwise_and(packed, 0x0F, out=q[:, :16], casting="unsafe")
        np.right_shift(packed, 4, out=q[:, 16:], casting="unsafe")
        q -= 8
        out = q.astype(np.float32)
        out *= scale
        return out.reshape(shape)
    if qtype == GGMLQuantizationType.Q6_K:
        return _dequantize_q6_k(data).reshape(shape)
    return np.asarray(quants.dequantize(data, qtype), dtype=np.float32).reshape(shape)


def _dequantize_q6_k(data: np.ndarray) -> np.ndarray:
    """Q6_K (the published Qwen3 interpreter's type), as ggml's dequantize_row_q6_K and gguf-py
    decode it, with fewer temporaries than gguf-py (a third of the time). A block of 256 values:
    ql (128 bytes, the low 4 bits), qh (64 bytes, the high 2 bits), 16 int8 scales, a float16 d;
    x = (d * scale[p // 16]) * (q - 32). In each half of 128 values, ql[0:64]'s low nibbles are
    values 0..63 and its high nibbles 64..127; qh[0:32]'s bit pairs 0-1, 2-3, 4-5, 6-7 top values
    0..31, 32..63, 64..95, 96..127."""
    blocks = data.reshape(-1, 210)
    n = len(blocks)
    ql = blocks[:, :128].reshape(n, 2, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    q = np.empty((n, 2, 128), np.uint8)
    np.bitwise_and(ql, 0x0F, out=q[:, :, :64])
    np.right_shift(ql, 4, out=q[:, :, 64:])
    high = np.right_shift(qh, np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1))  # (n, 2, 4, 32)
    high &= 0x03
    high <<= 4
    q.reshape(n, 2, 4, 32)[...] |= high
    signed = q.view(np.int8)
    signed -= 32
    d = blocks[:, 208:210].copy().view("<f2").astype(np.float32)  # (n, 1)
    scale = d * blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    out = np.empty((n, 16, 16), np.float32)
    np.multiply(signed.reshape(n, 16, 16), scale[:, :, None], out=out)
    return out
