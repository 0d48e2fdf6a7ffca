"""Reading a big GGUF model fast: the metadata and tensor index parsed in one pass with `struct`,
and the tensor data read in file order and dequantized with a few vectorised NumPy passes.

Why not gguf-py's GGUFReader here: it builds NumPy views for every string, about 2 s for the
100k vocabulary strings of a GPT-2 file, longer than everything else a cold start does. Adapters
and small files still go through `gguf_file.open_gguf` (whose `tensor_to_f32` uses `dequantize`
from here). The dequantization gives the same float32 bits as `gguf.quants.dequantize`, 3-10x
faster (tests/test_fast_load.py checks every supported type)."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, quants

from .errors import InvalidFileError
from .gguf_file import MAX_DIM, check_header, check_structure

_SCALARS = {  # value type -> struct format
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES = {  # numeric array element type -> NumPy dtype, for reading whole arrays at once
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
GGML_MAX_DIMS = 4


@dataclass(frozen=True)
class Field:
    """A metadata value, already decoded (str, int, float, bool or a list of them)."""

    value: Any

    def contents(self) -> Any:  # the GGUFReader field method gguf_file.get_field calls
        return self.value


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: np.ndarray  # GGUF order (ne: fastest dimension first), like GGUFReader's
    tensor_type: GGMLQuantizationType
    data_offset: int  # absolute, in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class GGUFIndex:
    """What GGUFReader offers for metadata (`fields`, `tensors`), without memory-mapping the data."""

    path: Path
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path, offset: int):
        self.buf, self.path, self.pos, self.size = buf, path, offset, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise InvalidFileError(f"{self.path}: {what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidFileError(f"{self.path}: {what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype != GGUFValueType.ARRAY or depth > 1:
            raise InvalidFileError(f"{self.path}: {what} has value type {vtype}, not a GGUF value type")
        itype = self.unpack("<I", what)
        count = self.unpack("<Q", what)
        if itype in _ARRAY_DTYPES:
            dtype = np.dtype(_ARRAY_DTYPES[itype])
            self.need(count * dtype.itemsize, what)
            arr = np.frombuffer(self.buf, dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return arr.tolist()
        if itype == GGUFValueType.STRING:
            self.need(count * 8, what)  # each string takes at least its length field
            out = []
            unpack_from, buf, path = struct.Struct("<Q").unpack_from, self.buf, self.path
            pos, size = self.pos, self.size
            try:
                for _ in range(count):  # the hot loop of a vocabulary: kept to the bare minimum
                    if pos + 8 > size:
                        raise InvalidFileError(f"{path}: {what} at byte {pos} runs past the end of the file ({size} bytes)")
                    (n,) = unpack_from(buf, pos)
                    pos += 8
                    if pos + n > size:
                        raise InvalidFileError(f"{path}: {what} at byte {pos} runs past the end of the file ({size} bytes)")
                    out.append(buf[pos:pos + n].decode("utf-8"))
                    pos += n
            except UnicodeDecodeError as exc:
                raise InvalidFileError(f"{path}: {what} holds a string that is not valid UTF-8 ({exc.reason})") from None
            self.pos = pos
            return out
        if itype == GGUFValueType.ARRAY:
            self.need(count * 12, what)
            return [self.value(itype, what, depth + 1) for _ in range(count)]
        raise InvalidFileError(f"{self.path}: {what} is an array of value type {itype}, not a GGUF value type")


def read_index(path: str | os.PathLike[str]) -> GGUFIndex:
    """Parse the header, metadata and tensor index; check every tensor lies inside the file."""
    path = Path(path)
    check_structure(path)  # the same limits and bounds checks as every other GGUF paw_lite reads
    _, n_tensors, n_kv = check_header(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, path, 24)
        fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.unpack("<I", f"metadata key {key!r}")
            if key in fields:
                raise InvalidFileError(f"{path}: metadata key {key!r} appears twice")
            fields[key] = Field(cur.value(vtype, f"metadata key {key!r}"))
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.unpack("<I", f"tensor {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise InvalidFileError(f"{path}: tensor {name} has {n_dims} dimensions, expected 1 to {GGML_MAX_DIMS}")
            dims = [cur.unpack("<Q", f"tensor {name}") for _ in range(n_dims)]
            raw_type = cur.unpack("<I", f"tensor {name}")
            offset = cur.unpack("<Q", f"tensor {name}")
            raw_infos.append((name, dims, raw_type, offset))
        end_of_index = cur.pos
        size = cur.size
    align = fields.get("general.alignment", Field(GGUF_DEFAULT_ALIGNMENT)).value
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise InvalidFileError(f"{path}: general.alignment is {align!r}, expected a power of two")
    data_offset = -(-end_of_index // align) * align
    tensors, seen = [], set()
    for name, dims, raw_type, offset in raw_infos:
        if name in seen:
            raise InvalidFileError(f"{path}: tensor {name} appears twice")
        seen.add(name)
        if any(d == 0 or d > MAX_DIM for d in dims):
            raise InvalidFileError(f"{path}: tensor {name} has dimensions {dims}")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise InvalidFileError(f"{path}: tensor {name} has unknown type {raw_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise InvalidFileError(f"{path}: tensor {name} rows of {dims[0]} values do not split into {qtype.name} blocks of {block}")
        n_bytes = int(np.prod(dims, dtype=object)) // block * type_size
        start = data_offset + offset
        if offset % align or start + n_bytes > size:
            raise InvalidFileError(f"{path}: tensor {name} (offset {offset}, {n_bytes} bytes) runs past the end of the file (truncated?)")
        tensors.append(TensorInfo(name, np.array(dims, np.uint64), qtype, start, n_bytes))
    end = data_offset
    for t in sorted(tensors, key=lambda t: t.data_offset):  # tensor data may not overlap
        if t.data_offset < end:
            raise InvalidFileError(f"{path}: tensor {t.name} overlaps the tensor before it")
        end = t.data_offset + t.n_bytes
    return GGUFIndex(path, fields, tensors, data_offset, size)


# -- tensor data --------------------------------------------------------------------------------

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
    return np.asarray(quants.dequantize(data, qtype), dtype=np.float32).reshape(shape)


def iter_tensors(index: GGUFIndex, tensors: list[TensorInfo] | None = None) -> Iterator[tuple[TensorInfo, bytes]]:
    """(info, raw bytes) of every tensor (or of `tensors`, a part of the index's), read in file
    order (read_index checked they do not overlap)."""
    with open(index.path, "rb") as f:
        for info in sorted(index.tensors if tensors is None else tensors, key=lambda t: t.data_offset):
            f.seek(info.data_offset)
            raw = f.read(info.n_bytes)
            if len(raw) != info.n_bytes:
                raise InvalidFileError(f"{index.path}: tensor {info.name} runs past the end of the file (truncated?)")
            yield info, raw
