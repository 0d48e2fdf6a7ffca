"""Where paw_lite keeps models and caches. Read once, when a function or command starts."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_RUNTIME_ID = "gpt2-q8_0"  # a Compact program's (families.COMPACT.runtime_id); Standard: qwen3-0.6b-q6_k
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def user_cache_root() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def models_dir() -> Path:
    """$PAW_LITE_MODELS, else <user cache>/paw_lite/models."""
    env = os.environ.get("PAW_LITE_MODELS")
    return Path(env).expanduser() if env else user_cache_root() / "paw_lite" / "models"


def cache_dir() -> Path:
    """$PAW_LITE_CACHE, else <user cache>/paw_lite/cache (prefix KV caches, temporary files)."""
    env = os.environ.get("PAW_LITE_CACHE")
    return Path(env).expanduser() if env else user_cache_root() / "paw_lite" / "cache"


def is_safe_name(name: str) -> bool:
    """Whether a runtime id can name a model file (`<runtime_id>.gguf`) without leaving the folder."""
    return bool(_SAFE_NAME.match(name))


def resolve_interpreter(base_model: str | os.PathLike[str] | None, runtime_id: str | None) -> Path:
    """The interpreter file for a program: an explicit path, else `<runtime_id>.gguf` in the models
    directory (`Program.runtime_id`: gpt2-q8_0 for Compact programs, qwen3-0.6b-q6_k for Standard ones)."""
    if base_model is not None:
        path = Path(base_model).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"{path}: no such interpreter model (pass a GGUF file or an HF folder: GPT-2 "
                                     f"for Compact programs, Qwen3 for Standard ones)")
        return path
    rid = runtime_id or DEFAULT_RUNTIME_ID
    if not is_safe_name(rid):
        raise ModelNotFoundError(f"program names runtime {rid!r}, which is not a valid model file name; pass base_model= / --base-model")
    directory = models_dir()
    path = directory / f"{rid}.gguf"
    if path.exists():
        return path
    raise ModelNotFoundError(
        f"interpreter {path.name} is not in the models directory {directory}. Get it with `paw-lite models pull` "
        f"(needs a network; or `paw-lite models import DIR` for files brought in by hand), pass --base-model PATH / "
        f"base_model=PATH (a GGUF file or HF folder of the program's interpreter), or set PAW_LITE_MODELS to the folder that holds it"
    )
