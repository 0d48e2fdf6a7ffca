"""What a server serves and the limits it holds requests to: one frozen dataclass the CLI builds
from its flags and tests build directly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..compiler.config import ModelFiles
from ..errors import PawError

API_KEY_ENV = "PAW_LITE_API_KEY"  # read by the CLI when --api-key is not given, never by the server


class ServeSettingsError(PawError, ValueError):
    """A setting out of range: names the setting and what it may be."""


@dataclass(frozen=True)
class ServeSettings:
    """programs_dir: every `*.paw` in it is a model named after its file stem.
    data_dir: the server's own files; programs compiled through the PAW API live in
    `data_dir / "compiled"` and are models too.
    api_key: when set, every route wants `Authorization: Bearer <api_key>`.
    Limits (each refusal is a 4xx JSON error): max_body_bytes per request body; max_input_chars
    per input text (a prompt or the last user message); max_batch prompts in one completions
    request; max_concurrent requests in evaluation at once (more get 429 rather than a queue
    that grows without bound); max_tokens_cap the largest max_tokens a request may ask for,
    also the default when it asks for none.
    interpreter: the interpreter (GPT-2 or Qwen3 GGUF or HF folder) the programs of its family run
    on; programs of the other family, and every program when it is None, run on their own
    `<runtime_id>.gguf` from models_dir, else paw_lite's models directory.
    compile_models / models_dir: the compiler's files, as `paw-lite compile` takes them (the
    PAW API's compile jobs use them); models_dir is also searched for interpreters.
    compile_threads: the threads of llama.cpp's passes in a compile job, nearly all of its time
    (None: every core). Fewer leave cores to inference while a compile runs; it takes longer.
    batch_size: sequences of one program evaluated together at most (one engine step).
    max_loaded: programs kept loaded at once (each holds its own merged weights, ~340 MB for
    GPT-2 124M); loading one more unloads the least recently used."""

    programs_dir: Path
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_input_chars: int = 32_000
    max_batch: int = 64
    max_concurrent: int = 256
    max_tokens_cap: int = 1024
    batch_size: int = 64
    max_loaded: int = 8
    interpreter: Path | None = None
    compile_models: ModelFiles = field(default_factory=ModelFiles)
    models_dir: Path | None = None
    cache_dir: Path | None = None  # prefix KV caches (None: paw_lite's default cache directory)
    compile_threads: int | None = None

    def __post_init__(self) -> None:
        def positive(value) -> bool:
            return not isinstance(value, bool) and isinstance(value, int) and value >= 1

        for name in ("max_body_bytes", "max_input_chars", "max_batch", "max_concurrent", "max_tokens_cap", "batch_size",
                     "max_loaded"):
            if not positive(getattr(self, name)):
                raise ServeSettingsError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        if self.compile_threads is not None and not positive(self.compile_threads):
            raise ServeSettingsError(f"compile_threads must be a positive integer, or None for every core, "
                                     f"not {self.compile_threads!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ServeSettingsError(f"port must be 0..65535 (0: any free port), not {self.port!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ServeSettingsError("api_key must be a non-empty string, or None for no key")
        for name in ("programs_dir", "data_dir"):
            if not isinstance(getattr(self, name), Path):
                object.__setattr__(self, name, Path(getattr(self, name)))

    @property
    def compiled_dir(self) -> Path:
        """Where programs compiled through the server are written (`<program id>.paw`)."""
        return self.data_dir / "compiled"


def api_key_from_env(given: str | None) -> str | None:
    """The key a command line asks for: --api-key, else $PAW_LITE_API_KEY, else None."""
    if given is not None:
        return given
    value = os.environ.get(API_KEY_ENV)
    return value if value else None
