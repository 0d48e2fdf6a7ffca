"""The on-disk KV cache of a program's prefix. A file is trusted only when its key, shape and
checksum all match; anything else is reported and recomputed."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path

import numpy as np

from .atomic import atomic_path

log = logging.getLogger("paw_lite")

MAGIC = b"PAWKV\x00\x01\n"
FORMAT_VERSION = 1
_MAX_HEADER = 64 * 1024


def cache_key(base_fingerprint: str, adapter_sha256: str, prefix_ids: list[int]) -> str:
    payload = json.dumps([FORMAT_VERSION, base_fingerprint, adapter_sha256, prefix_ids], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(directory: Path, key: str) -> Path:
    return directory / "prefix" / f"{key}.kv"


def save(path: Path, key: str, k: np.ndarray, v: np.ndarray) -> None:
    data_k, data_v = np.ascontiguousarray(k, np.float32), np.ascontiguousarray(v, np.float32)
    digest = hashlib.sha256(data_k.tobytes())
    digest.update(data_v.tobytes())
    header = json.dumps({"key": key, "shape": list(k.shape), "sha256": digest.hexdigest()}).encode()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header)
            f.write(data_k.tobytes())
            f.write(data_v.tobytes())


def load(path: Path, key: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(k, v) from a cache file, or None when it is absent, stale or corrupt."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("prefix cache %s unreadable (%s); recomputing", path, exc)
        return None
    reason = None
    n = int(np.prod(shape)) * 4
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 4:
        reason = "bad magic"
    else:
        (hlen,) = struct.unpack("<I", raw[len(MAGIC):len(MAGIC) + 4])
        start = len(MAGIC) + 4
        try:
            header = json.loads(raw[start:start + hlen]) if hlen <= _MAX_HEADER else None
        except ValueError:
            header = None
        body = raw[start + hlen:]
        if not isinstance(header, dict):
            reason = "bad header"
        elif header.get("key") != key or header.get("shape") != list(shape):
            reason = "key or shape mismatch"
        elif len(body) != 2 * n:
            reason = f"{len(body)} data bytes, expected {2 * n}"
        elif hashlib.sha256(body).hexdigest() != header.get("sha256"):
            reason = "checksum mismatch"
    if reason:
        log.warning("prefix cache %s is invalid (%s); recomputing", path, reason)
        return None
    k = np.frombuffer(body, np.float32, count=n // 4).reshape(shape)
    v = np.frombuffer(body, np.float32, offset=n).reshape(shape)
    return k, v
