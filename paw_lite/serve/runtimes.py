"""Runtime manifests for the PAW API's `GET /api/v1/models/runtimes/{runtime_id}`.

The official client (programasweights 0.4.14, cache.py) asks the server for the manifest of the
runtime a program names, then downloads the manifest's base model and checks its size and sha256.
For the two published runtimes, `gpt2-q8_0` (Compact programs) and `qwen3-0.6b-q6_k` (Standard
programs), the client pins its own built-in manifest (`cache.LEGACY_RUNTIME_MANIFESTS`): a served
one must agree with it, and the interpreter always comes from its published address. So:

- `gpt2-q8_0`, `qwen3-0.6b-q6_k`: the client's own manifest, built here from the numbers paw_lite
  pins for the same files (paw_lite/models/manifest.json; a test checks the two agree).
- any other runtime id: the stem of an interpreter GGUF this server has (GPT-2 or Qwen3: the
  compilers' interpreters, the one programs run on, or `<runtime_id>.gguf` in a models directory).
  Its manifest names this server's `.../runtimes/<id>/gguf` as the base model's address, with the
  file's size and sha256, so the unmodified client downloads the interpreter from here. A compiler
  GGUF (a Qwen3 too) is never a runtime.

A runtime id is checked against a safe charset before it names a file."""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import paths
from ..base_model import file_sha256, read_header
from ..compiler.config import FAMILY_FILE_NAMES
from ..errors import PawError
from ..families import COMPACT, FAMILIES, STANDARD, Family
from ..qwen3_layout import Qwen3Config

PUBLISHED: dict[str, Family] = {f.runtime_id: f for f in FAMILIES.values()}
PLACEHOLDER = "{INPUT_PLACEHOLDER}"
MANIFEST_VERSION = 1
N_CTX = 2048  # the official manifests' local_sdk.n_ctx for both runtimes (the context the client asks llama.cpp for)
# base_inference.template of each family: how the SDK runs the bare interpreter (cache.py
# GPT2_BASE_PROMPT_TEMPLATE and QWEN3_BASE_PROMPT_TEMPLATE: the Qwen chat turn, thinking off).
BASE_TEMPLATES = {COMPACT.name: PLACEHOLDER,
                  STANDARD.name: ("<|im_start|>user\n" + PLACEHOLDER + "<|im_end|>\n<|im_start|>assistant\n"
                                  "<think>\n\n</think>\n\n")}
# File names of the compilers' GGUFs in a models directory (any quantization): never a runtime.
_COMPILER_GLOBS = sorted({name.replace("{quant}", "*") for names in FAMILY_FILE_NAMES.values()
                          for role, (name, _) in names.items() if role in ("compiler", "pseudo_compiler")})
class UnknownRuntimeError(PawError, LookupError):
    """No interpreter on this server has this runtime id."""


def _common(family: Family, runtime_id: str, display_name: str) -> dict[str, Any]:
    """The fields every runtime of a family shares: the text prompt contract of the official manifests."""
    return {
        "runtime_id": runtime_id,
        "manifest_version": MANIFEST_VERSION,
        "display_name": display_name,
        "interpreter": family.interpreter,
        "adapter_format": "gguf_lora",
        "prompt_template": {"format": "rendered_text", "placeholder": PLACEHOLDER},
        "base_inference": {"contract_version": 1, "format": "rendered_text", "placeholder": PLACEHOLDER,
                           "template": BASE_TEMPLATES[family.name]},
    }


def _assets(family: Family) -> dict[str, Any]:
    """program_assets: Compact programs ship their prefix KV cache in the published manifest; a
    Standard program has none (its meta.json prefix_steps is null)."""
    if family.prefix_steps is None:
        return {"adapter_filename": "adapter.gguf", "prefix_cache_required": False,
                "prefix_cache_filename": None, "prefix_tokens_filename": None}
    return {"adapter_filename": "adapter.gguf", "prefix_cache_required": True,
            "prefix_cache_filename": "prefix_cache.bin", "prefix_tokens_filename": "prefix_tokens.json"}


def published_manifest(runtime_id: str = COMPACT.runtime_id) -> dict[str, Any]:
    """The official client's built-in manifest of a published runtime (cache.LEGACY_RUNTIME_MANIFESTS)."""
    from ..models_dir.manifest import manifest_entry

    family = PUBLISHED[runtime_id]
    entry = manifest_entry(family.name, "interpreter")
    repo = entry.source["repo"]
    base = {"provider": "huggingface", "repo": repo, "file": entry.name,
            "url": f"https://huggingface.co/{repo}/resolve/main/{entry.name}",
            "size_bytes": entry.bytes, "sha256": entry.sha256}
    names = {COMPACT.name: "GPT-2 124M (Q8_0)", STANDARD.name: "Qwen3 0.6B (Q6_K)"}
    # the web SDK runs GPT-2 programs only (its manifest carries the same file for it)
    js = ({"supported": True, "base_model": dict(base), "prefix_cache_supported": True} if family == COMPACT
          else {"supported": False, "base_model": None, "prefix_cache_supported": False})
    return {
        **_common(family, runtime_id, names[family.name]),
        "program_assets": _assets(family),
        "local_sdk": {"supported": True, "base_model": base, "n_ctx": N_CTX},
        "js_sdk": js,
    }


def local_manifest(runtime_id: str, gguf: Path, *, family: Family = COMPACT, size: int, sha256: str, n_ctx: int,
                   url: str) -> dict[str, Any]:
    """The manifest of an interpreter this server has, downloadable from `url`. Its program assets
    ask for no prefix cache: the SDK evaluates the prefix itself."""
    return {
        **_common(family, runtime_id, f"{family.model} interpreter {gguf.name} (served by paw-lite)"),
        "program_assets": _assets(STANDARD),
        "local_sdk": {"supported": True, "n_ctx": n_ctx,
                      "base_model": {"provider": "paw-lite", "file": f"{runtime_id}.gguf", "url": url,
                                     "size_bytes": size, "sha256": sha256}},
        "js_sdk": {"supported": False, "base_model": None, "prefix_cache_supported": False},
    }


def is_compiler_file(path: Path) -> bool:
    """Whether a file is named as a compiler or pseudo compiler GGUF of a models directory."""
    return any(fnmatch.fnmatchcase(path.name, pattern) for pattern in _COMPILER_GLOBS)


class Runtimes:
    """The runtimes this server can describe. `interpreters()` lists the interpreter files it has
    (called per request: files may come and go); sha256 sums are computed once per file version."""

    def __init__(self, interpreters: Callable[[], Iterable[Path | None]], models_dirs: Callable[[], Iterable[Path | None]],
                 compiler_files: Callable[[], Iterable[Path | None]] = lambda: ()):
        self._interpreters = interpreters
        self._models_dirs = models_dirs
        self._compiler_files = compiler_files  # the compilers' GGUFs: never served as runtimes
        self._lock = threading.Lock()
        self._sha256: dict[tuple[str, int, int], str] = {}  # by (path, size, mtime)
        self._headers: dict[tuple[str, int, int], tuple[Family, int] | None] = {}  # None: no interpreter GGUF

    def file(self, runtime_id: str) -> Path:
        """The interpreter GGUF a runtime id names on this server, or UnknownRuntimeError."""
        if not paths.is_safe_name(runtime_id):
            raise UnknownRuntimeError(f"runtime {runtime_id[:80]!r} not found: not a valid runtime id "
                                      f"(letters, digits, '.', '_', '-')")
        candidates = [p for p in self._interpreters() if p is not None]
        candidates += [Path(d) / f"{runtime_id}.gguf" for d in self._models_dirs() if d is not None]
        compilers = {Path(p).resolve() for p in self._compiler_files() if p is not None}
        for path in candidates:
            # an interpreter only: a models folder also holds the compiler GGUFs (Qwen3 models too), which are no runtime
            if (path.suffix == ".gguf" and path.stem == runtime_id and path.is_file() and not is_compiler_file(path)
                    and path.resolve() not in compilers and self._facts(path) is not None):
                return path
        have = sorted({p.stem for p in self._interpreters() if p is not None and p.suffix == ".gguf" and p.is_file()} | set(PUBLISHED))
        raise UnknownRuntimeError(f"runtime {runtime_id!r} not found: this server has no interpreter {runtime_id}.gguf "
                                  f"(its runtimes: {', '.join(have)})")

    def manifest(self, runtime_id: str, base_url: str) -> dict[str, Any]:
        """The manifest of a runtime id; `base_url` is this server's address as the client sees it."""
        if runtime_id in PUBLISHED:
            return published_manifest(runtime_id)
        path = self.file(runtime_id)
        sha256, family, n_ctx = self._file_facts(path)
        url = f"{base_url.rstrip('/')}/api/v1/models/runtimes/{runtime_id}/gguf"
        return local_manifest(runtime_id, path, family=family, size=path.stat().st_size, sha256=sha256, n_ctx=n_ctx,
                              url=url)

    def _file_facts(self, path: Path) -> tuple[str, Family, int]:
        """(sha256, family, n_ctx) of an interpreter file, computed once per file version."""
        facts = self._facts(path)
        if facts is None:
            raise UnknownRuntimeError(f"{path.name} is not an interpreter GGUF (GPT-2 or Qwen3)")
        family, n_ctx = facts
        key = _stat_key(path)
        with self._lock:
            sha256 = self._sha256.get(key)
        if sha256 is None:
            sha256 = file_sha256(path)
            with self._lock:
                self._sha256[key] = sha256
        return sha256, family, n_ctx

    def _facts(self, path: Path) -> tuple[Family, int] | None:
        """(family, context) of an interpreter GGUF, or None for a file that is not one (read once per version)."""
        key = _stat_key(path)
        with self._lock:
            if key in self._headers:
                return self._headers[key]
        try:
            config, _ = read_header(path)
            facts: tuple[Family, int] | None = (STANDARD if isinstance(config, Qwen3Config) else COMPACT, config.n_ctx)
        except PawError:
            facts = None
        with self._lock:
            self._headers[key] = facts
        return facts


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def models_dirs(*dirs: Path | None) -> list[Path]:
    """The models directories to look in: the ones given, then paw_lite's own ($PAW_LITE_MODELS)."""
    out = [Path(d).expanduser() for d in dirs if d is not None]
    env_dir = paths.models_dir()
    return out + ([env_dir] if env_dir not in out else [])


__all__ = ["PUBLISHED", "Runtimes", "UnknownRuntimeError", "is_compiler_file", "local_manifest", "models_dirs", "published_manifest"]
