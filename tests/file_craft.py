"""Test helpers that build and take apart GGUF and ZIP files byte by byte: hand-made headers for the
security tests, and the positions of every numeric header field so the fuzzer can aim at them.

Written from the format descriptions, independently of paw_lite's own reader."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Iterable

from gguf import GGMLQuantizationType, GGUFValueType

SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One metadata entry: the payload is the encoded value (see kv_str, kv_scalar, kv_array)."""
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_str(key: str, value: str | bytes) -> bytes:
    return kv(key, GGUFValueType.STRING, gstr(value))


def kv_scalar(key: str, vtype: GGUFValueType, value) -> bytes:
    return kv(key, vtype, struct.pack(SCALAR_FORMATS[vtype], value))


def kv_array(key: str, itype: int, items: Iterable[bytes], count: int | None = None) -> bytes:
    items = list(items)
    n = len(items) if count is None else count
    return kv(key, GGUFValueType.ARRAY, struct.pack("<IQ", itype, n) + b"".join(items))


def tensor_info(name: str | bytes, ne: Iterable[int], qtype: int, offset: int) -> bytes:
    ne = list(ne)
    return gstr(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", qtype, offset)


def gguf(kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, version: int = 3, n_tensors: int | None = None,
         n_kv: int | None = None, alignment: int = 32) -> bytes:
    """A GGUF file from encoded parts; counts default to the number of parts (override them to lie)."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    body += b"\0" * (-len(body) % alignment)
    return body + data


ADAPTER_KVS = [kv_str("general.architecture", "gpt2"), kv_str("general.type", "adapter"), kv_str("adapter.type", "lora"),
               kv_scalar("adapter.lora.alpha", GGUFValueType.FLOAT32, 16.0)]


def f32_tensor(name: str, rows: int, cols: int, offset: int) -> bytes:
    return tensor_info(name, [cols, rows], GGMLQuantizationType.F32, offset)


# -- field positions ---------------------------------------------------------------------------------

class _Walk:
    def __init__(self, raw: bytes):
        self.raw, self.pos, self.fields = raw, 0, []

    def num(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        (value,) = struct.unpack_from(fmt, self.raw, self.pos)
        self.fields.append((self.pos, size))
        self.pos += size
        return value

    def string(self) -> None:
        n = self.num("<Q")
        self.pos += n

    def value(self, vtype: int) -> None:
        if vtype == GGUFValueType.STRING:
            self.string()
        elif vtype == GGUFValueType.ARRAY:
            itype = self.num("<I")
            for _ in range(self.num("<Q")):
                self.value(itype)
        else:
            self.num(SCALAR_FORMATS[GGUFValueType(vtype)])


def gguf_fields(raw: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every count, length, type, dimension and offset in a valid GGUF header."""
    w = _Walk(raw)
    w.pos = 4
    w.num("<I")
    n_tensors, n_kv = w.num("<Q"), w.num("<Q")
    for _ in range(n_kv):
        w.string()
        w.value(w.num("<I"))
    for _ in range(n_tensors):
        w.string()
        for _ in range(w.num("<I")):
            w.num("<Q")
        w.num("<I")
        w.num("<Q")
    return w.fields


# Field widths after the 4-byte signature of each ZIP record.
_LOCAL = (2, 2, 2, 2, 2, 4, 4, 4, 2, 2)  # version, flags, method, time, date, crc, sizes, name and extra lengths
_CENTRAL = (2, 2, 2, 2, 2, 2, 4, 4, 4, 2, 2, 2, 2, 2, 4, 4)  # ..., disk, attributes, local header offset
_EOCD = (2, 2, 2, 2, 4, 4, 2)


def zip_fields(raw: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every numeric field of the local headers, central directory and end record."""
    out: list[tuple[int, int]] = []

    def add(start: int, widths: tuple[int, ...]) -> None:
        pos = start + 4
        for width in widths:
            out.append((pos, width))
            pos += width

    eocd = raw.rfind(b"PK\x05\x06")
    add(eocd, _EOCD)
    (cd_offset,) = struct.unpack_from("<I", raw, eocd + 16)
    pos = cd_offset
    while raw[pos:pos + 4] == b"PK\x01\x02":
        add(pos, _CENTRAL)
        n_name, n_extra, n_comment = struct.unpack_from("<3H", raw, pos + 28)
        (local,) = struct.unpack_from("<I", raw, pos + 42)
        add(local, _LOCAL)
        pos += 46 + n_name + n_extra + n_comment
    return out


# (offset in the central directory entry, offset in the local header or None, width)
_ZIP_ENTRY_FIELDS = {"flags": (8, 6, 2), "method": (10, 8, 2), "crc": (16, 14, 4), "csize": (20, 18, 4),
                     "usize": (24, 22, 4), "external_attr": (38, None, 4)}


def patch_zip_entry(raw: bytes, name: str, field: str, value: int) -> bytes:
    """Overwrite one field of member `name` in both its central directory entry and local header."""
    out = bytearray(raw)
    cd_off, local_off, width = _ZIP_ENTRY_FIELDS[field]
    encoded = name.encode()
    pos = raw.find(b"PK\x01\x02")
    while pos >= 0:
        n_name = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46:pos + 46 + n_name] == encoded:
            out[pos + cd_off:pos + cd_off + width] = value.to_bytes(width, "little")
            if local_off is not None:
                (local,) = struct.unpack_from("<I", raw, pos + 42)
                out[local + local_off:local + local_off + width] = value.to_bytes(width, "little")
            return bytes(out)
        pos = raw.find(b"PK\x01\x02", pos + 4)
    raise KeyError(name)


def gguf_table(raw: bytes) -> tuple[dict[str, int], dict[str, dict], int]:
    """Where things are in a valid GGUF file: ({key: offset of its value type}, {tensor name:
    {"n_dims", "ne" (list), "type", "offset": byte positions; "data": absolute data position}},
    start of the data section)."""
    w = _Walk(raw)
    w.pos = 4
    w.num("<I")
    n_tensors, n_kv = w.num("<Q"), w.num("<Q")
    keys: dict[str, int] = {}
    alignment = 32
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", raw, w.pos)
        key = raw[w.pos + 8:w.pos + 8 + n].decode()
        w.string()
        keys[key] = w.pos
        vtype = w.num("<I")
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", raw, w.pos)[0]
        w.value(vtype)
    tensors: dict[str, dict] = {}
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", raw, w.pos)
        name = raw[w.pos + 8:w.pos + 8 + n].decode()
        w.string()
        entry: dict = {"n_dims": w.pos}
        n_dims = w.num("<I")
        entry["ne"] = [w.pos + 8 * i for i in range(n_dims)]
        w.pos += 8 * n_dims
        entry["type"] = w.pos
        entry["offset"] = w.pos + 4
        w.pos += 12
        tensors[name] = entry
    data_start = -(-w.pos // alignment) * alignment
    for entry in tensors.values():
        entry["data"] = data_start + struct.unpack_from("<Q", raw, entry["offset"])[0]
    return keys, tensors, data_start


def patched(raw: bytes, pos: int, fmt: str, value) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, pos, value)
    return bytes(out)


def peak_while(fn) -> int:
    """Peak bytes allocated (Python and NumPy) while fn runs."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak
