"""The pseudo compiler's KV state after the part of its prompt that no spec changes (~330 of ~380
tokens of the examples prompt), kept on disk: a compile then evaluates only the spec and what
follows it. A file is used only when its key (model identity, llama.cpp version, the exact token
ids) and its checksum match; anything else is reported and rebuilt."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

from ..atomic import atomic_path, remove_stale_temporaries

log = logging.getLogger("paw_lite.compiler")

MAGIC = b"PAWLLST\x01"
FORMAT_VERSION = 1
_MAX_HEADER = 4 * 1024 * 1024
_PROBES = ("a", "\n\n  Zz 9 {spec} <|im_end|>\n")  # specs that differ at once, in letters, spaces and newlines


def file_identity(path: str | os.PathLike[str]) -> str:
    """A cheap identity of a (multi-GB) model file: its size and the hashes of its first and last
    MiB (the metadata and tensor table are at the start)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def spec_independent_prefix(prompt_ids_for) -> list[int]:
    """The token ids every prompt starts with, whatever the spec: the common prefix of the prompts of
    very different probe specs, less two tokens of margin (a later spec may still merge with the
    boundary; a cached state is used only after an exact token comparison anyway)."""
    a, b = (prompt_ids_for(p) for p in _PROBES)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:max(0, n - 2)]


class PromptStateCache:
    """One file per (model, prompt prefix) under `directory`."""

    def __init__(self, directory: Path, model_path: Path, settings: str):
        """settings: what else changes the numbers in the state (KV cache type, weight layout)."""
        self.directory = directory
        self._model_key = json.dumps([FORMAT_VERSION, file_identity(model_path), _llama_version(), settings])

    def _key(self, tokens: list[int]) -> str:
        return hashlib.sha256((self._model_key + json.dumps(tokens, separators=(",", ":"))).encode()).hexdigest()

    def path(self, tokens: list[int]) -> Path:
        return self.directory / f"{self._key(tokens)[:40]}.llstate"

    def load(self, tokens: list[int]) -> bytes | None:
        path = self.path(tokens)
        try:
            with open(path, "rb") as f:
                head = f.read(len(MAGIC) + 4)
                if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
                    return self._invalid(path, "bad magic")
                (hlen,) = struct.unpack("<I", head[len(MAGIC):])
                if hlen > _MAX_HEADER:
                    return self._invalid(path, f"a header of {hlen} bytes")
                header = json.loads(f.read(hlen))
                size = int(header["size"])
                if header.get("key") != self._key(tokens) or size != os.fstat(f.fileno()).st_size - len(MAGIC) - 4 - hlen:
                    return self._invalid(path, "key or size mismatch")
                blob = f.read(size)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return self._invalid(path, str(exc))
        if hashlib.sha256(blob).hexdigest() != header.get("sha256"):
            return self._invalid(path, "checksum mismatch")
        return blob

    def save(self, tokens: list[int], blob: bytes) -> None:
        path = self.path(tokens)
        header = json.dumps({"key": self._key(tokens), "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                             "n_tokens": len(tokens)}).encode()
        try:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    f.write(MAGIC + struct.pack("<I", len(header)) + header)
                    f.write(blob)
            remove_stale_temporaries(path.parent)
        except OSError as exc:
            log.warning("cannot write the prompt cache %s (%s); continuing without it", path, exc)

    @staticmethod
    def _invalid(path: Path, reason: str) -> None:
        log.warning("prompt cache %s is invalid (%s); recomputing", path, reason)
        return None


def _llama_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:  # noqa: BLE001 - a missing distribution record only weakens the key
        return "unknown"
