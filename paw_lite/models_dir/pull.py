"""`paw-lite models pull`: download the published repos from the hub and import them."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import ModelNotFoundError, require
from ..families import COMPACT
from .importing import ImportOptions, import_dir
from .manifest import SHARED, ManifestEntry, load_manifest


_OFFLINE_HINT = (
    "Without a network: on a machine with one, download programasweights/GPT2-GGUF-Q8_0 (gpt2-q8_0.gguf) and "
    "programasweights/paw-4b-gpt2 (compiler/, lora_mapper.pt, meta.json) for Compact programs, "
    "programasweights/Qwen3-0.6B-GGUF-Q6_K (qwen3-0.6b-q6_k.gguf) and programasweights/paw-4b-qwen3-0.6b for "
    "Standard ones, and Qwen/Qwen3-4B-Instruct-2507 (or a GGUF of it), copy them into one folder here (each "
    "download in a folder of its own) and run `paw-lite models import DIR`")


def _check_online(hub: Any, timeout: float = 5.0) -> None:
    """Fail in seconds, not after minutes of retries, when the hub cannot be reached."""
    if getattr(hub.constants, "HF_HUB_OFFLINE", False):
        raise ModelNotFoundError(f"HF_HUB_OFFLINE is set: `paw-lite models pull` needs the hub. {_OFFLINE_HINT}")
    url = urlparse(hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as exc:
        raise ModelNotFoundError(f"cannot reach {hub.constants.ENDPOINT} ({exc.strerror or exc}). {_OFFLINE_HINT}") from exc


def pull(directory: Path, options: ImportOptions = ImportOptions(), *, hub: Any = None,
         on_tensor: Callable[[str], None] | None = None,
         on_step: Callable[[str, int | None], None] | None = None) -> list[dict[str, Any]]:
    """Download the published repos of `options.families` (resumable: the hub cache lives in
    `<models>/.hub-cache`) and import them. `hub` is the huggingface_hub module (tests pass a stand-in)."""
    if hub is None:
        hub = require("huggingface_hub", "pull")
        require("huggingface_hub.constants", "pull")  # a lazy submodule: import it so hub.constants exists
    manifest = load_manifest()
    _check_online(hub)
    cache = directory / ".hub-cache"
    families = options.families or (COMPACT.name,)
    wanted = [e for e in manifest if e.role in options.roles and any(e.serves_family(f) for f in families)]
    by_repo: dict[str, list[ManifestEntry]] = {}
    for entry in wanted:
        by_repo.setdefault(entry.source["repo"], []).append(entry)
    done: list[dict[str, Any]] = []
    for repo, entries in by_repo.items():
        patterns = sorted({pattern for e in entries for pattern in e.source["files"]})
        try:
            snap = Path(hub.snapshot_download(repo, allow_patterns=patterns, cache_dir=str(cache)))
        except Exception as exc:  # the hub raises many types (HTTP, connection, auth): report one line
            raise ModelNotFoundError(f"{repo}: download failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                                     f"{_OFFLINE_HINT}") from exc
        roles = tuple(r for r in options.roles if any(e.role == r for e in entries))
        of_repo = tuple(sorted({e.family for e in entries} - {SHARED})) or families
        done += import_dir(snap, directory, ImportOptions(options.quant, options.compiler_quant, roles, of_repo),
                           on_tensor, on_step)
    return done
