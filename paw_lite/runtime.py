"""Running a program: `paw_lite.function(program)` returns a callable fuzzy function."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import paths, prefix_cache
from .base_model import BaseModel
from .errors import ContextOverflowError, IncompatibleModelError, PawError
from .gpt2 import KVCache, forward
from .lora import LoraAdapter
from .program import ADAPTER, Program

PREFILL_CHUNK = 512  # bounds the attention score buffer to (heads, 512, n_ctx)


def load_adapter(program: Program, base: BaseModel, scratch_dir: Path) -> LoraAdapter:
    """Parse the program's adapter.gguf (gguf-py reads from a path, so the bytes go to a private temp file)."""
    with program.adapter_file(scratch_dir) as path:
        adapter = LoraAdapter.from_gguf(path, base.config)
    for key, value in (("lora_rank", adapter.rank), ("lora_alpha", adapter.alpha)):
        declared = program.meta.get(key)
        if declared is not None and float(declared) != float(value):
            raise IncompatibleModelError(f"{program.source}: meta.json says {key} {declared} but {ADAPTER} has {value}")
    return adapter


class PawFunction:
    """A program bound to an interpreter: call it on text, or map it over many texts.

    Calls are serialised by a lock: one function owns one KV cache. Use one function per thread
    for parallel work."""

    def __init__(self, program: Program, base: BaseModel, *, cache_dir: Path | None, owns_base: bool):
        self.program = program
        self.config = base.config
        self.tokenizer = base.tokenizer
        scratch = cache_dir if cache_dir is not None else Path(tempfile.gettempdir()) / "paw_lite"
        adapter = load_adapter(program, base, scratch / "tmp")
        # A base loaded for this function alone is merged in place (its arrays are private copies
        # of the file's data); a shared base stays untouched.
        self._weights = adapter.merged_into(base.weights, inplace=owns_base)
        self._prefix_ids = self.tokenizer.encode(program.prefix)
        self._suffix_ids = self.tokenizer.encode(program.suffix)
        if len(self._prefix_ids) + len(self._suffix_ids) >= self.config.n_ctx:
            raise ContextOverflowError(
                f"{program.source}: the template alone is {len(self._prefix_ids) + len(self._suffix_ids)} tokens; "
                f"the interpreter's context holds {self.config.n_ctx}")
        self._cache = KVCache(self.config)
        self._lock = threading.Lock()
        adapter_sha = hashlib.sha256(program.adapter_gguf).hexdigest()
        self.prefix_cache_key = prefix_cache.cache_key(base.fingerprint, adapter_sha, self._prefix_ids)
        self._prefix_k, self._prefix_v = self._load_or_build_prefix(cache_dir)
        self._valid = 0  # positions of self._cache that currently hold the prefix's keys and values

    # -- public -------------------------------------------------------------------------------

    @property
    def spec(self) -> str | None:
        return self.program.spec

    @property
    def pseudo_program(self) -> str | None:
        return self.program.pseudo_program

    def __call__(self, text: str, max_tokens: int | None = None) -> str:
        return self.tokenizer.decode(self.generate_ids(text, max_tokens)).strip()

    def generate_ids(self, text: str, max_tokens: int | None = None) -> list[int]:
        """The greedy output token ids for one input (EOS not included)."""
        ids = self.prompt_ids(text)
        with self._lock:
            return self._generate(ids, max_tokens)

    def map(self, texts: Iterable[str], max_tokens: int | None = None, batch_size: int = 16) -> list[str]:
        """Outputs for many inputs, identical to calling the function on each."""
        return [self(t, max_tokens) for t in texts]

    def close(self) -> None:
        self._weights = {}
        self._cache = None  # type: ignore[assignment]

    def __enter__(self) -> "PawFunction":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prompt_ids(self, text: str) -> list[int]:
        """The full prompt's token ids, checked against the context size."""
        if not isinstance(text, str):
            raise TypeError(f"input must be str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PawError(f"input is not valid Unicode: {exc.reason} at position {exc.start}") from None
        ids = self.tokenizer.encode_prompt(self.program.prefix, text, self.program.suffix)
        if len(ids) >= self.config.n_ctx:
            n_fixed = len(self._prefix_ids) + len(self._suffix_ids)
            raise ContextOverflowError(
                f"prompt is {len(ids)} tokens (template {n_fixed} + input {len(ids) - n_fixed}); the interpreter's "
                f"context holds {self.config.n_ctx}, leaving room for inputs up to {self.config.n_ctx - n_fixed - 1} tokens")
        return ids

    # -- internals ----------------------------------------------------------------------------

    def _prefill(self, ids: list[int], n_past: int) -> np.ndarray:
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            logits = forward(chunk, self._weights, self.config, self._cache, n_past + start)
        assert logits is not None
        return logits

    def _load_or_build_prefix(self, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
        n = len(self._prefix_ids)
        shape = (self.config.n_layer, self.config.n_head, n, self.config.head_dim)
        path = prefix_cache.cache_path(cache_dir, self.prefix_cache_key) if cache_dir is not None else None
        if path is not None:
            cached = prefix_cache.load(path, self.prefix_cache_key, shape)
            if cached is not None:
                return cached
        if n:
            self._prefill(self._prefix_ids, 0)
        k, v = self._cache.k[:, :, :n].copy(), self._cache.v[:, :, :n].copy()
        if path is not None:
            try:
                prefix_cache.save(path, self.prefix_cache_key, k, v)
            except OSError as exc:
                prefix_cache.log.warning("cannot write prefix cache %s (%s); continuing without it", path, exc)
        return k, v

    def _restore_prefix(self, n: int) -> None:
        if self._valid < n:
            self._cache.k[:, :, self._valid:n] = self._prefix_k[:, :, self._valid:n]
            self._cache.v[:, :, self._valid:n] = self._prefix_v[:, :, self._valid:n]
            self._valid = n

    def _generate(self, ids: list[int], max_tokens: int | None) -> list[int]:
        if max_tokens is not None and max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 or None, not {max_tokens}")
        n_ctx = self.config.n_ctx
        room = n_ctx - len(ids)
        limit = room if max_tokens is None else min(max_tokens, room)
        if limit == 0:
            return []
        # Reuse the cached prefix for the tokens the prompt shares with it (all of them, unless
        # the input merges with the prefix's last token in BPE); at least one token is evaluated.
        shared = 0
        for a, b in zip(ids, self._prefix_ids):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(ids) - 1)
        self._restore_prefix(shared)
        self._valid = shared
        logits = self._prefill(ids[shared:], shared)
        out: list[int] = []
        pos = len(ids)
        eos = self.tokenizer.eos_id
        while True:
            token = int(np.argmax(logits))
            if token == eos:
                break
            out.append(token)
            if len(out) >= limit:
                break
            logits = forward([token], self._weights, self.config, self._cache, pos)
            pos += 1
        return out


def function(program: str | os.PathLike[str] | Program, base_model: str | os.PathLike[str] | BaseModel | None = None,
             *, cache_dir: str | os.PathLike[str] | None = None, prefix_cache_enabled: bool = True) -> PawFunction:
    """Load a program (a `.paw` file, a program folder or a Program) and bind it to its interpreter.

    base_model: a GPT-2 GGUF file or HF folder, a loaded BaseModel, or None for the program's
    runtime in the models directory ($PAW_LITE_MODELS or the user cache).
    cache_dir: where prefix KV caches live ($PAW_LITE_CACHE or the user cache by default)."""
    prog = program if isinstance(program, Program) else Program.load(program)
    if isinstance(base_model, BaseModel):
        base, owns = base_model, False
    else:
        base, owns = BaseModel.load(paths.resolve_interpreter(base_model, prog.meta.get("runtime_id"))), True
    directory = Path(cache_dir) if cache_dir is not None else paths.cache_dir()
    return PawFunction(prog, base, cache_dir=directory if prefix_cache_enabled else None, owns_base=owns)
