"""Read torch's zip checkpoints (`torch.save` since 1.6) without importing torch or running pickle code.

A checkpoint is a ZIP holding `<name>/data.pkl` (a pickle describing the objects) and one raw
storage per `<name>/data/<key>`. The pickle is not handed to `pickle`: its opcodes are listed by
`pickletools.genops` (parsing only) and executed here by a small stack machine that knows the
opcodes torch writes for plain containers. A global is resolved only through `_GLOBALS`, which maps
the handful a state dict needs to local stand-ins (tensor rebuilders that make NumPy views of the
storages, OrderedDict, storage and dtype markers); any other global, or any opcode outside the
table, is refused before anything is called. Storages are memory-mapped and every tensor's extent
is checked against its storage before a view is made.

bf16 tensors are widened to float32 (exact); every other dtype keeps its NumPy equivalent."""

from __future__ import annotations

import collections
import math
import os
import pickletools
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paw_lite.errors import InvalidFileError, regular_file_size
from paw_lite.program import ZIP_ERRORS
from paw_lite.safetensors_file import bf16_to_f32

MAX_PICKLE_BYTES = 64 * 1024 * 1024
MAX_DIMS = 16


@dataclass(frozen=True)
class _StorageType:
    """Stands in for torch.FloatStorage & co: only its element type matters."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _DType:
    """Stands in for torch.float32 & co (can appear as values, e.g. a saved dtype)."""

    name: str


@dataclass
class _Storage:
    data: np.ndarray  # 1-D, the storage's element type (bf16 as uint16)
    is_bf16: bool


_STORAGES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"), "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidFileError(f"{what} is {value!r}, expected an integer")
    return value


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    """A read-only NumPy view of `storage` with torch's offset, size and stride (all in elements),
    after checking the view stays inside the storage."""
    if not isinstance(storage, _Storage):
        raise InvalidFileError(f"tensor storage is {type(storage).__name__}, expected a storage record")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride) or len(size) > MAX_DIMS:
        raise InvalidFileError(f"tensor size {size!r} / stride {stride!r} are malformed")
    offset = _int(offset, "tensor storage offset")
    dims = [_int(d, "tensor size") for d in size]
    steps = [_int(s, "tensor stride") for s in stride]
    n = storage.data.shape[0]
    if offset < 0 or any(d < 0 for d in dims) or any(s < 0 for s in steps):
        raise InvalidFileError(f"tensor offset {offset}, size {dims}, stride {steps}: negative values")
    if math.prod(dims) > n:
        raise InvalidFileError(f"tensor of size {dims} has more elements than its storage ({n}); expanded views are not supported")
    if math.prod(dims) == 0:
        out = np.zeros(dims, dtype=storage.data.dtype)
    else:
        last = offset + sum((d - 1) * s for d, s in zip(dims, steps))
        if last >= n:
            raise InvalidFileError(f"tensor offset {offset}, size {dims}, stride {steps} reaches element {last} "
                                   f"of a storage of {n} elements")
        item = storage.data.dtype.itemsize
        out = np.lib.stride_tricks.as_strided(storage.data[offset:], shape=dims, strides=[s * item for s in steps],
                                              writeable=False)
    return bf16_to_f32(out) if storage.is_bf16 else out


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise InvalidFileError(f"parameter data is {type(data).__name__}, expected a tensor")
    return data


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    if args:  # torch writes OrderedDict() then SETITEMS; an argument would be an arbitrary iterable
        raise InvalidFileError("OrderedDict called with arguments; only the empty constructor is allowed")
    return collections.OrderedDict()


# (module, name) -> what the name resolves to. Nothing outside this table can be reached.
_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", n): _StorageType(n, d) for n, d in _STORAGES.items()},
    **{("torch", n): _DType(n) for n in _DTYPES},
}
_CALLABLE = (_ordered_dict, _rebuild_tensor_v2, _rebuild_parameter)


class _Mark:
    pass


_MARK = _Mark()


class _Machine:
    """Executes the opcodes of one data.pkl over the allowed globals."""

    def __init__(self, source: str, persistent_load: Callable[[Any], Any]):
        self.source = source
        self.persistent_load = persistent_load
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}

    def fail(self, pos: int, msg: str) -> InvalidFileError:
        return InvalidFileError(f"{self.source}: pickle opcode at byte {pos}: {msg}")

    def pop_mark(self, pos: int) -> list[Any]:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1:]
                del self.stack[i:]
                return items
        raise self.fail(pos, "MARK expected on the stack")

    def pop(self, pos: int) -> Any:
        if not self.stack or self.stack[-1] is _MARK:
            raise self.fail(pos, "stack underflow")
        return self.stack.pop()

    def global_(self, module: str, name: str, pos: int) -> Any:
        target = _GLOBALS.get((module, name))
        if target is None:
            raise self.fail(pos, f"refers to {module}.{name}, which a plain state dict does not need; refused "
                                 "(this file may try to run code on load)")
        return target

    def run(self, data: bytes) -> Any:
        ops = {
            "PROTO": lambda a, p: None, "FRAME": lambda a, p: None,
            "MARK": lambda a, p: self.stack.append(_MARK),
            "NONE": lambda a, p: self.stack.append(None),
            "NEWTRUE": lambda a, p: self.stack.append(True), "NEWFALSE": lambda a, p: self.stack.append(False),
            "EMPTY_DICT": lambda a, p: self.stack.append({}), "EMPTY_LIST": lambda a, p: self.stack.append([]),
            "EMPTY_TUPLE": lambda a, p: self.stack.append(()),
            "TUPLE": lambda a, p: self.stack.append(tuple(self.pop_mark(p))),
            "LIST": lambda a, p: self.stack.append(list(self.pop_mark(p))),
            "DICT": lambda a, p: self.stack.append(self._pairs({}, self.pop_mark(p), p)),
            "BUILD": self._build, "REDUCE": self._reduce,
            "SETITEM": self._setitem, "SETITEMS": self._setitems, "APPEND": self._append, "APPENDS": self._appends,
            "BINPERSID": lambda a, p: self.stack.append(self.persistent_load(self.pop(p))),
            "GLOBAL": lambda a, p: self.stack.append(self.global_(*(a.split(" ", 1) + [""])[:2], p)),
            "STACK_GLOBAL": self._stack_global,
            "MEMOIZE": lambda a, p: self.memo.__setitem__(len(self.memo), self._top(p)),
            "STOP": None,
        }
        for name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            ops[name] = self._tuple_n(int(name[-1]))
        for name in ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT", "BINUNICODE", "SHORT_BINUNICODE",
                     "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):
            ops[name] = lambda a, p: self.stack.append(a)
        for name in ("BINPUT", "LONG_BINPUT"):
            ops[name] = lambda a, p: self.memo.__setitem__(a, self._top(p))
        for name in ("BINGET", "LONG_BINGET"):
            ops[name] = self._get
        try:
            for op, arg, pos in pickletools.genops(data):
                handler = ops.get(op.name, _MARK)
                if handler is _MARK:
                    raise self.fail(pos, f"opcode {op.name} is not allowed in a state dict")
                if handler is None:  # STOP
                    if len(self.stack) != 1:
                        raise self.fail(pos, f"{len(self.stack)} objects left on the stack at STOP")
                    return self.stack[0]
                handler(arg, pos)
        except (ValueError, struct.error, UnicodeDecodeError, IndexError, OverflowError, TypeError, KeyError,
                RecursionError) as exc:  # a call with the wrong arguments, an unhashable key, deep nesting
            raise InvalidFileError(f"{self.source}: malformed pickle: {type(exc).__name__}: {str(exc)[:200]}") from exc
        raise InvalidFileError(f"{self.source}: pickle ends without STOP (truncated?)")

    def _top(self, pos: int) -> Any:
        if not self.stack:
            raise self.fail(pos, "memo store on an empty stack")
        return self.stack[-1]

    def _get(self, arg: int, pos: int) -> None:
        if arg not in self.memo:
            raise self.fail(pos, f"memo key {arg} was never stored")
        self.stack.append(self.memo[arg])

    def _tuple_n(self, n: int):
        def op(arg: Any, pos: int) -> None:
            items = [self.pop(pos) for _ in range(n)][::-1]
            self.stack.append(tuple(items))
        return op

    def _stack_global(self, arg: Any, pos: int) -> None:
        name, module = self.pop(pos), self.pop(pos)
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.fail(pos, "STACK_GLOBAL needs two strings")
        self.stack.append(self.global_(module, name, pos))

    def _reduce(self, arg: Any, pos: int) -> None:
        args, func = self.pop(pos), self.pop(pos)
        if not any(func is f for f in _CALLABLE) or not isinstance(args, tuple):
            raise self.fail(pos, f"REDUCE of {func!r}: only tensor rebuilders and OrderedDict may be called")
        self.stack.append(func(*args))

    def _build(self, arg: Any, pos: int) -> None:
        state = self.pop(pos)
        target = self._top(pos)
        # torch pickles a state dict's OrderedDict with its `_metadata` (module versions) as BUILD state.
        if not isinstance(target, collections.OrderedDict) or not isinstance(state, dict):
            raise self.fail(pos, f"BUILD on {type(target).__name__}: only an OrderedDict's attributes may be set")
        if set(state) - {"_metadata"}:
            raise self.fail(pos, f"BUILD sets {sorted(map(str, state))}; only a state dict's _metadata is allowed")
        target.__dict__.update(state)

    def _pairs(self, target: Any, items: list[Any], pos: int) -> Any:
        if not isinstance(target, dict) or len(items) % 2:
            raise self.fail(pos, f"SETITEMS on {type(target).__name__} with {len(items)} items")
        for k, v in zip(items[::2], items[1::2]):
            try:
                target[k] = v
            except TypeError as exc:
                raise self.fail(pos, f"unusable dict key {type(k).__name__}") from exc
        return target

    def _setitem(self, arg: Any, pos: int) -> None:
        v, k = self.pop(pos), self.pop(pos)
        self._pairs(self._top(pos), [k, v], pos)

    def _setitems(self, arg: Any, pos: int) -> None:
        items = self.pop_mark(pos)
        self._pairs(self._top(pos), items, pos)

    def _append(self, arg: Any, pos: int) -> None:
        v = self.pop(pos)
        target = self._top(pos)
        if not isinstance(target, list):
            raise self.fail(pos, f"APPEND on {type(target).__name__}")
        target.append(v)

    def _appends(self, arg: Any, pos: int) -> None:
        items = self.pop_mark(pos)
        target = self._top(pos)
        if not isinstance(target, list):
            raise self.fail(pos, f"APPENDS on {type(target).__name__}")
        target.extend(items)


class TorchCheckpoint:
    """A torch zip checkpoint opened for reading: `load()` returns its object, tensors as NumPy arrays."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self._size = regular_file_size(self.path)
            with open(self.path, "rb") as f:
                head = f.read(16)
        except OSError as exc:
            raise InvalidFileError(f"{self.path}: cannot read: {exc.strerror}") from exc
        if not head.startswith(b"PK\x03\x04"):
            legacy = head[:3] == b"\x80\x02\x8a"  # pickle protocol 2, then a long: the legacy magic number
            kind = "a legacy (pre-1.6) torch file; re-save it with torch>=1.6" if legacy else "not a torch zip checkpoint"
            raise InvalidFileError(f"{self.path}: {kind} (expected a ZIP archive written by torch.save)")
        try:
            self._zip = zipfile.ZipFile(self.path)
            self._infos = {i.filename: i for i in self._zip.infolist()}
        except ZIP_ERRORS as exc:
            raise InvalidFileError(f"{self.path}: unreadable ZIP archive (truncated?): {exc}") from exc
        pkls = [n for n in self._infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise InvalidFileError(f"{self.path}: expected exactly one <name>/data.pkl in the archive, found {pkls}")
        self._prefix = pkls[0][: -len("data.pkl")]
        order = self._small(self._prefix + "byteorder", default=b"little")
        if order != b"little":
            raise InvalidFileError(f"{self.path}: byteorder is {order!r}; only little-endian checkpoints are supported")
        self._storages: dict[str, _Storage] = {}

    def _small(self, name: str, default: bytes) -> bytes:
        info = self._infos.get(name)
        if info is None:
            return default
        if info.file_size > 64:
            raise InvalidFileError(f"{self.path}: {name} is {info.file_size} bytes, expected a few")
        try:
            return self._zip.read(info)
        except ZIP_ERRORS as exc:
            raise InvalidFileError(f"{self.path}: cannot read {name}: {exc}") from exc

    def _entry_map(self, name: str, dtype: np.dtype, numel: int) -> np.ndarray:
        """A read-only memory map of one stored (uncompressed) archive member."""
        info = self._infos.get(name)
        if info is None:
            raise InvalidFileError(f"{self.path}: storage {name} is referenced but missing from the archive")
        if info.compress_type != zipfile.ZIP_STORED:
            raise InvalidFileError(f"{self.path}: {name} is compressed; torch stores storages uncompressed")
        if info.file_size != numel * dtype.itemsize:
            raise InvalidFileError(f"{self.path}: {name} holds {info.file_size} bytes, but the pickle declares "
                                   f"{numel} elements of {dtype.itemsize} bytes")
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise InvalidFileError(f"{self.path}: bad local header for {name} (truncated or corrupt archive)")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > self._size:
            raise InvalidFileError(f"{self.path}: {name} runs past the end of the file (truncated?)")
        if numel == 0:
            return np.zeros(0, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=start, shape=(numel,))

    def _persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise InvalidFileError(f"{self.path}: unsupported persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not key.isalnum():
            raise InvalidFileError(f"{self.path}: malformed storage record {str(pid)[:80]}")
        numel = _int(numel, f"{self.path}: storage {key} size")
        if key not in self._storages:  # shared storages: one map, many views
            data = self._entry_map(f"{self._prefix}data/{key}", storage_type.dtype, numel)
            self._storages[key] = _Storage(data, storage_type.name == "BFloat16Storage")
        storage = self._storages[key]
        if storage.data.shape[0] != numel:
            raise InvalidFileError(f"{self.path}: storage {key} is declared with {numel} and {storage.data.shape[0]} elements")
        return storage

    def load(self) -> Any:
        info = self._infos[self._prefix + "data.pkl"]
        if info.file_size > MAX_PICKLE_BYTES:
            raise InvalidFileError(f"{self.path}: data.pkl is {info.file_size} bytes, over the {MAX_PICKLE_BYTES}-byte limit")
        try:
            data = self._zip.read(info)
        except ZIP_ERRORS as exc:
            raise InvalidFileError(f"{self.path}: cannot read data.pkl (truncated or corrupt archive): {exc}") from exc
        try:
            return _Machine(str(self.path), self._persistent_load).run(data)
        except InvalidFileError as exc:
            msg = str(exc)
            raise InvalidFileError(msg if msg.startswith(str(self.path)) else f"{self.path}: {msg}") from None


def load(path: str | os.PathLike[str]) -> Any:
    """The object a torch checkpoint holds (dicts, lists, numbers, strings; tensors as NumPy arrays)."""
    return TorchCheckpoint(path).load()


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A flat state dict: str -> array. Anything else (nested checkpoints, optimizer states) is refused."""
    obj = load(path)
    if not isinstance(obj, dict):
        raise InvalidFileError(f"{path}: holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        shown = ", ".join(repr(k)[:40] for k in bad[:3])  # repr: a huge int key has no str() past 4300 digits
        raise InvalidFileError(f"{path}: not a flat state dict: entries {shown} are not name -> tensor")
    return dict(obj)
