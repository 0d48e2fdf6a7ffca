"""Runtime manifests for the PAW API's `GET /api/v1/models/runtimes/{runtime_id}`.

The official client (programasweights 0.4.14, cache.py) asks the server for the manifest of the
runtime a program names, then downloads the manifest's base model and checks its size and sha256.
For `gpt2-q8_0` the client pins its own built-in manifest (`cache.LEGACY_RUNTIME_MANIFESTS`): a
served one must agree with it, and the interpreter always comes from its published address. So:

- `gpt2-q8_0`: the client's own manifest, built here from the numbers paw_lite pins for the same
  file (models/manifest.json; a test checks the two agree).
- any other runtime id: the stem of an interpreter GGUF this server has (the compiler's
  interpreter, the one programs run on, or `<runtime_id>.gguf` in a models directory). Its
  manifest names this server's `.../runtimes/<id>/gguf` as the base model's address, with the
  file's size and sha256, so the unmodified client downloads the interpreter from here.

A runtime id is checked against a safe charset before it names a file."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import paths
from ..base_model import file_sha256, read_header
from ..errors import PawError

PUBLISHED = paths.DEFAULT_RUNTIME_ID
PLACEHOLDER = "{INPUT_PLACEHOLDER}"
MANIFEST_VERSION = 1
GPT2_N_CTX = 2048  # the official manifest's local_sdk.n_ctx for gpt2-q8_0 (the context the client asks llama.cpp for)


class UnknownRuntimeError(PawError, LookupError):
    """No interpreter on this server has this runtime id."""


def _common(runtime_id: str, display_name: str) -> dict[str, Any]:
    """The fields every GPT-2 runtime shares: the text prompt contract of the official manifests."""
    return {
        "runtime_id": runtime_id,
        "manifest_version": MANIFEST_VERSION,
        "display_name": display_name,
        "interpreter": "gpt2",
        "adapter_format": "gguf_lora",
        "prompt_template": {"format": "rendered_text", "placeholder": PLACEHOLDER},
        "base_inference": {"contract_version": 1, "format": "rendered_text", "placeholder": PLACEHOLDER,
                           "template": PLACEHOLDER},
    }


def published_manifest() -> dict[str, Any]:
    """The official client's built-in manifest of `gpt2-q8_0` (cache.LEGACY_RUNTIME_MANIFESTS)."""
    from ..models_dir.manifest import load_manifest

    entry = load_manifest()["interpreter"]
    repo = entry.source["repo"]
    base = {"provider": "huggingface", "repo": repo, "file": entry.name,
            "url": f"https://huggingface.co/{repo}/resolve/main/{entry.name}",
            "size_bytes": entry.bytes, "sha256": entry.sha256}
    return {
        **_common(PUBLISHED, "GPT-2 124M (Q8_0)"),
        "program_assets": {"adapter_filename": "adapter.gguf", "prefix_cache_required": True,
                           "prefix_cache_filename": "prefix_cache.bin", "prefix_tokens_filename": "prefix_tokens.json"},
        "local_sdk": {"supported": True, "base_model": base, "n_ctx": GPT2_N_CTX},
        "js_sdk": {"supported": True, "base_model": dict(base), "prefix_cache_supported": True},
    }


def local_manifest(runtime_id: str, gguf: Path, *, size: int, sha256: str, n_ctx: int, url: str) -> dict[str, Any]:
    """The manifest of an interpreter this server has, downloadable from `url`."""
    return {
        **_common(runtime_id, f"GPT-2 interpreter {gguf.name} (served by paw-lite)"),
        "program_assets": {"adapter_filename": "adapter.gguf", "prefix_cache_required": False,
                           "prefix_cache_filename": None, "prefix_tokens_filename": None},
        "local_sdk": {"supported": True, "n_ctx": n_ctx,
                      "base_model": {"provider": "paw-lite", "file": f"{runtime_id}.gguf", "url": url,
                                     "size_bytes": size, "sha256": sha256}},
        "js_sdk": {"supported": False, "base_model": None, "prefix_cache_supported": False},
    }


class Runtimes:
    """The runtimes this server can describe. `interpreters()` lists the interpreter files it has
    (called per request: files may come and go); sha256 sums are computed once per file version."""

    def __init__(self, interpreters: Callable[[], Iterable[Path | None]], models_dirs: Callable[[], Iterable[Path | None]]):
        self._interpreters = interpreters
        self._models_dirs = models_dirs
        self._lock = threading.Lock()
        self._sha256: dict[tuple[str, int, int], str] = {}  # by (path, size, mtime)
        self._headers: dict[tuple[str, int, int], int | None] = {}  # n_ctx, None: not a GPT-2 GGUF

    def file(self, runtime_id: str) -> Path:
        """The interpreter GGUF a runtime id names on this server, or UnknownRuntimeError."""
        if not paths.is_safe_name(runtime_id):
            raise UnknownRuntimeError(f"runtime {runtime_id[:80]!r} not found: not a valid runtime id "
                                      f"(letters, digits, '.', '_', '-')")
        candidates = [p for p in self._interpreters() if p is not None]
        candidates += [Path(d) / f"{runtime_id}.gguf" for d in self._models_dirs() if d is not None]
        for path in candidates:
            # a GPT-2 interpreter only: a models folder also holds the compiler GGUFs, which are no runtime
            if path.suffix == ".gguf" and path.stem == runtime_id and path.is_file() and self._n_ctx(path) is not None:
                return path
        have = sorted({p.stem for p in self._interpreters() if p is not None and p.suffix == ".gguf" and p.is_file()} | {PUBLISHED})
        raise UnknownRuntimeError(f"runtime {runtime_id!r} not found: this server has no interpreter {runtime_id}.gguf "
                                  f"(its runtimes: {', '.join(have)})")

    def manifest(self, runtime_id: str, base_url: str) -> dict[str, Any]:
        """The manifest of a runtime id; `base_url` is this server's address as the client sees it."""
        if runtime_id == PUBLISHED:
            return published_manifest()
        path = self.file(runtime_id)
        sha256, n_ctx = self._file_facts(path)
        url = f"{base_url.rstrip('/')}/api/v1/models/runtimes/{runtime_id}/gguf"
        return local_manifest(runtime_id, path, size=path.stat().st_size, sha256=sha256, n_ctx=n_ctx, url=url)

    def _file_facts(self, path: Path) -> tuple[str, int]:
        """(sha256, n_ctx) of an interpreter file, computed once per file version."""
        n_ctx = self._n_ctx(path)
        if n_ctx is None:
            raise UnknownRuntimeError(f"{path.name} is not a GPT-2 interpreter GGUF")
        key = _stat_key(path)
        with self._lock:
            sha256 = self._sha256.get(key)
        if sha256 is None:
            sha256 = file_sha256(path)
            with self._lock:
                self._sha256[key] = sha256
        return sha256, n_ctx

    def _n_ctx(self, path: Path) -> int | None:
        """The context of a GPT-2 GGUF, or None for a file that is not one (read once per version)."""
        key = _stat_key(path)
        with self._lock:
            if key in self._headers:
                return self._headers[key]
        try:
            config, _ = read_header(path)
            n_ctx: int | None = config.n_ctx
        except PawError:
            n_ctx = None
        with self._lock:
            self._headers[key] = n_ctx
        return n_ctx


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def models_dirs(*dirs: Path | None) -> list[Path]:
    """The models directories to look in: the ones given, then paw_lite's own ($PAW_LITE_MODELS)."""
    out = [Path(d).expanduser() for d in dirs if d is not None]
    env_dir = paths.models_dir()
    return out + ([env_dir] if env_dir not in out else [])


__all__ = ["PUBLISHED", "Runtimes", "UnknownRuntimeError", "local_manifest", "models_dirs", "published_manifest"]
