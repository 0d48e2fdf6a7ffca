"""A small safetensors reader over np.memmap that also reads bf16 (safetensors.numpy cannot).

The header is size-checked before it is read; every tensor's byte range is checked against the file."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from .errors import InvalidFileError, regular_file_size

MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bf16 is the top half of a float32: widen by a 16-bit shift."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """Lazy access to the tensors of one .safetensors file."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            size = regular_file_size(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise InvalidFileError(f"{self.path}: {size} bytes is too short for a safetensors file")
                if head[:4] in (b"GGUF", b"PK\x03\x04"):  # the two other formats users mix it up with
                    kind = "a GGUF" if head[:4] == b"GGUF" else "a zip (a torch checkpoint or a .paw?)"
                    raise InvalidFileError(f"{self.path}: this is {kind} file, not a safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > min(MAX_HEADER_BYTES, size - 8):
                    raise InvalidFileError(f"{self.path}: header length {n} exceeds the file or the {MAX_HEADER_BYTES}-byte limit")
                header = json.loads(f.read(n).decode("utf-8"))
        except OSError as exc:
            raise InvalidFileError(f"{self.path}: cannot read: {exc.strerror}") from exc
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidFileError(f"{self.path}: header is not valid JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise InvalidFileError(f"{self.path}: header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int, str]] = {}
        for name, info in header.items():
            try:
                dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidFileError(f"{self.path}: tensor {name!r} has a malformed header entry") from exc
            if not all(type(v) is int for v in (*shape, begin, end)):  # JSON floats, bools, strings
                raise InvalidFileError(f"{self.path}: tensor {name!r} has a shape or byte range that is not whole numbers")
            if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
                raise InvalidFileError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
            dtype = _DTYPES[dtype_name]
            count = math.prod(shape)  # Python ints: a product past 2**63 cannot wrap round to a small size
            if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_len or end - begin != count * dtype.itemsize:
                raise InvalidFileError(f"{self.path}: tensor {name!r} (shape {shape}, {dtype_name}) has byte range {begin}..{end}, inconsistent with the file")
            self._entries[name] = (dtype, shape, begin, end, dtype_name)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._data_start else np.zeros(0, np.uint8)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype_name(self, name: str) -> str:
        return self._entries[name][4]

    def byte_range(self, name: str) -> tuple[int, int]:
        """Absolute (start, end) file offsets of a tensor's bytes, for readers that stream without mapping."""
        _, _, begin, end, _ = self._entries[name]
        return self._data_start + begin, self._data_start + end

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (a read-only view of the file; bf16 as uint16)."""
        dtype, shape, begin, end, _ = self._entries[name]
        start = self._data_start + begin
        return self._map[start:start + (end - begin)].view(dtype).reshape(shape)

    def f32(self, name: str) -> np.ndarray:
        """The tensor as a fresh float32 array."""
        raw = self.raw(name)
        if self._entries[name][4] == "BF16":
            return bf16_to_f32(raw)
        return raw.astype(np.float32)
