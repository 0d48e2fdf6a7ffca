"""The on-disk KV cache of a program's prefix. A file is trusted only when its key, shape and
checksum all match; anything else is reported and recomputed."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .atomic import atomic_path, remove_stale_temporaries

log = logging.getLogger("paw_lite")

MAGIC = b"PAWKV\x00\x01\n"
FORMAT_VERSION = 1
_MAX_HEADER = 64 * 1024


def cache_key(family: str, base_fingerprint: str, adapter_sha256: str, prefix_ids: list[int]) -> str:
    """What the prefix's keys and values depend on: the program family (its forward pass), the
    interpreter's content, the adapter's and the prefix's token ids."""
    payload = json.dumps([FORMAT_VERSION, family, base_fingerprint, adapter_sha256, prefix_ids], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(directory: Path, key: str) -> Path:
    return directory / "prefix" / f"{key}.kv"


def save(path: Path, key: str, k: np.ndarray, v: np.ndarray) -> None:
    """Write atomically (two processes saving the same key leave one complete file), then clear
    what killed writers left behind in the same folder."""
    data_k, data_v = np.ascontiguousarray(k, np.float32), np.ascontiguousarray(v, np.float32)
    digest = hashlib.sha256(data_k.tobytes())
    digest.update(data_v.tobytes())
    header = json.dumps({"key": key, "shape": list(k.shape), "sha256": digest.hexdigest()}).encode()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header)
            f.write(data_k.tobytes())
            f.write(data_v.tobytes())
    remove_stale_temporaries(path.parent)


def load(path: Path, key: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(k, v) from a cache file, or None when it is absent, stale or corrupt. The file's size is
    checked against the expected shape before its data is read."""
    n = math.prod(shape) * 4
    try:
        with open(path, "rb") as f:
            reason, body = _read_checked(f, key, shape, n)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("prefix cache %s unreadable (%s); recomputing", path, exc)
        return None
    if reason:
        log.warning("prefix cache %s is invalid (%s); recomputing", path, reason)
        return None
    k = np.frombuffer(body, np.float32, count=n // 4).reshape(shape)
    v = np.frombuffer(body, np.float32, offset=n).reshape(shape)
    return k, v


def _read_checked(f: BinaryIO, key: str, shape: tuple[int, ...], n: int) -> tuple[str | None, bytes]:
    """(reason it is invalid or None, the k and v bytes)."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(len(MAGIC) + 4)
    if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
        return "bad magic", b""
    (hlen,) = struct.unpack("<I", head[len(MAGIC):])
    if hlen > _MAX_HEADER:
        return f"header of {hlen} bytes", b""
    try:
        header = json.loads(f.read(hlen))
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        return "bad header", b""
    if header.get("key") != key or header.get("shape") != list(shape):
        return "key or shape mismatch", b""
    have = size - len(head) - hlen
    if have != 2 * n:
        return f"{have} data bytes, expected {2 * n}", b""
    body = f.read(2 * n)
    if len(body) != 2 * n:
        return "file shrank while being read", b""
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        return "checksum mismatch", b""
    return None, body
