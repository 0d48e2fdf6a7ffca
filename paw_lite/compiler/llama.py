"""A thin layer over llama-cpp-python's low-level API: load a GGUF, tokenize, decode chunks, read
logits, embeddings and intermediate layer outputs. Only the compiler imports this module.

The high-level `llama_cpp.Llama` is not used: it keeps an (n_ctx x n_vocab) score table (620 MB for
Qwen's vocabulary at 1024 positions) and its `embed` reads pooling-NONE outputs at wrong offsets."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidFileError, PawError, require
from .. import interrupts
from ..gguf_file import read_index

log = logging.getLogger("paw_lite.compiler")

_BACKEND_READY = False


def _lib():
    """The llama_cpp ctypes binding, initialised once (and its C logging quietened unless asked for)."""
    global _BACKEND_READY
    llama_cpp = require("llama_cpp", "compile")
    if not _BACKEND_READY:
        # The binding prints every C log line unless its logger has a level; its level table is off
        # by one for this llama.cpp (warnings arrive as errors), so quiet means CRITICAL. `-v` shows all.
        lc_log = logging.getLogger("llama-cpp-python")
        if lc_log.level == logging.NOTSET:
            lc_log.setLevel(logging.DEBUG if log.isEnabledFor(logging.INFO) else logging.CRITICAL)
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
    return llama_cpp


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class LlamaModel:
    """One GGUF model loaded by llama.cpp (weights memory-mapped). Close it to unmap the weights."""

    def __init__(self, path: str | os.PathLike[str], *, vocab_only: bool = False, repack: bool = True):
        """repack: let llama.cpp copy the weights into its CPU-interleaved layouts (faster batched
        matmuls, but a second copy in memory beside the mapped file: measured on Qwen3-4B Q4_K_M,
        peak RSS 4.3 GB with it, 2.7 GB without, the same decode speed, prefill 24 vs 20 tokens/s)."""
        self.path = Path(path)
        if self.path.is_dir():
            raise InvalidFileError(f"{self.path}: is a folder, not a model file; pass the .gguf file itself")
        if not self.path.is_file():
            raise InvalidFileError(f"{self.path}: no such model file")
        # The same bounded walk as for the files paw_lite reads itself: a truncated or malformed
        # file is named precisely here, not as llama.cpp's bare NULL (or its abort on a
        # general.alignment of another type than UINT32).
        read_index(self.path)
        lib = _lib()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        params.vocab_only = vocab_only
        params.use_extra_bufts = repack
        self._lib = lib
        self._model = None
        try:
            with interrupts.deferred() as interrupted:  # llama.cpp logs through a Python callback while it loads
                if interrupted is not interrupts.never:  # only where the Ctrl-C is ours to record
                    # Returning false from the progress callback makes llama.cpp stop loading (NULL).
                    keep_loading = lib.llama_progress_callback(lambda progress, data: not interrupted())
                    params.progress_callback = keep_loading
                self._model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        except KeyboardInterrupt:  # arrived as the load finished: not a model nobody can free
            self.close()
            raise
        if not self._model:
            # llama-cpp-python prints llama.cpp's errors when its logger's level lets them through
            shown = logging.getLogger("llama-cpp-python").level <= logging.ERROR
            where = "its log is above" if shown else "run with -v to see its log"
            raise InvalidFileError(f"{self.path}: llama.cpp could not load this GGUF ({where})")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        self.n_layer = lib.llama_model_n_layer(self._model)
        self.n_embd = lib.llama_model_n_embd(self._model)
        if vocab_only:  # llama.cpp leaves the hyperparameters unset: read them from the metadata
            arch = self.meta("general.architecture")
            try:
                self.n_layer = int(self.meta(f"{arch}.block_count") or 0)
                self.n_embd = int(self.meta(f"{arch}.embedding_length") or 0)
            except ValueError:
                self.n_layer = self.n_embd = 0
        if self.n_layer <= 0 or self.n_embd <= 0:
            self.close()
            raise InvalidFileError(f"{self.path}: no block_count / embedding_length in the metadata")

    def close(self) -> None:
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata and vocabulary ------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = self._lib.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int) -> str:
        return self._lib.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def special_token_texts(self) -> dict[str, str]:
        """The special tokens a chat template may read, as transformers passes them (`eos_token`, ...).
        `bos_token` only when the model adds one: Qwen's HF tokenizer has none, although GGUF
        converters record a bos id for it."""
        out = {}
        wanted = {"eos_token": self._lib.llama_vocab_eos(self._vocab), "pad_token": self._lib.llama_vocab_pad(self._vocab)}
        if self.meta("tokenizer.ggml.add_bos_token") == "true":
            wanted["bos_token"] = self._lib.llama_vocab_bos(self._vocab)
        for name, token in wanted.items():
            if 0 <= token < self.n_vocab:
                out[name] = self.token_text(token)
        return out

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Token ids without BOS/EOS added; `special` recognises control tokens written in the text."""
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self._lib.llama_token * cap)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, False, special)
        if n < 0:
            raise PawError(f"{self.path}: llama.cpp failed to tokenize {len(data)} bytes of text")
        return list(buf[:n])

    def single_token(self, text: str) -> int:
        """The id of a token written as text (`<|im_end|>`, `<prefix_1>`); an error if it is not one token."""
        ids = self.tokenize(text, special=True)
        if len(ids) != 1:
            raise InvalidFileError(f"{self.path}: {text!r} is not a single token of this model's vocabulary (got ids {ids[:8]})")
        return ids[0]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of the ids with control tokens dropped (transformers' `skip_special_tokens=True`)."""
        if not ids:
            return ""
        arr = (self._lib.llama_token * len(ids))(*ids)
        cap = 8 * len(ids) + 64
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = self._lib.llama_detokenize(self._vocab, arr, len(ids), buf, cap, True, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n
        raise PawError(f"{self.path}: llama.cpp failed to detokenize {len(ids)} tokens")

    # -- contexts -----------------------------------------------------------------------------------

    def context(self, settings: "ContextSettings", cb_eval: Callable | None = None) -> "LlamaContext":
        return LlamaContext(self, settings, cb_eval)


@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int
    n_ubatch: int = 512
    n_threads: int | None = None
    embeddings: bool = False
    f32_kv_cache: bool = False  # F16 (the default) loses ~5e-3 in hidden states; the encoder wants F32
    flash_attn: bool | None = None  # None: llama.cpp decides; the encoder turns it off (it costs ~5e-3)


class LlamaContext:
    """A llama.cpp context over one sequence, fed with `decode` in chunks of at most n_ubatch tokens,
    so each call is one graph evaluation with known positions."""

    def __init__(self, model: LlamaModel, settings: ContextSettings, cb_eval: Callable | None):
        lib = model._lib
        self._lib, self.model, self.settings = lib, model, settings
        params = lib.llama_context_default_params()
        params.n_ctx = settings.n_ctx
        params.n_batch = params.n_ubatch = settings.n_ubatch
        params.n_seq_max = 1
        threads = settings.n_threads or default_threads()
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = settings.embeddings
        params.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        params.no_perf = True
        if settings.f32_kv_cache:
            params.type_k = params.type_v = lib.GGML_TYPE_F32
        if settings.flash_attn is not None:
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        # The callback objects must outlive the context: keep references.
        self._cb = lib.ggml_backend_sched_eval_callback(cb_eval) if cb_eval is not None else None
        if self._cb is not None:
            params.cb_eval = self._cb
            params.cb_eval_user_data = None
        # `decode` installs this for the length of a call where a Ctrl-C is recorded (llama.cpp asks
        # it between graph nodes); elsewhere no abort callback runs Python, whose SIGINT handler
        # may be someone else's and must not run inside C.
        self._interrupted: Callable[[], bool] = interrupts.never
        self._abort = lib.ggml_abort_callback(lambda data: self._interrupted())
        self._ctx = None
        self._batch = None
        try:
            with interrupts.deferred():
                self._ctx = lib.llama_init_from_model(model._model, params)
        except KeyboardInterrupt:
            self.close()
            raise
        if not self._ctx:
            raise PawError(f"{model.path}: llama.cpp could not create a context of {settings.n_ctx} tokens (out of memory?)")
        self.n_ctx = lib.llama_n_ctx(self._ctx)
        self._batch = lib.llama_batch_init(settings.n_ubatch, 0, 1)
        self.n_past = 0

    def close(self) -> None:
        if self._ctx:
            if self._batch is not None:
                self._lib.llama_batch_free(self._batch)
                self._batch = None
            self._lib.llama_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> "LlamaContext":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_embeddings(self, on: bool) -> None:
        self._lib.llama_set_embeddings(self._ctx, on)

    def truncate(self, n: int) -> None:
        """Forget every position from n on (to reuse a shared prompt prefix)."""
        mem = self._lib.llama_get_memory(self._ctx)
        if not self._lib.llama_memory_seq_rm(mem, 0, n, -1):
            self._lib.llama_memory_clear(mem, True)
            n = 0
        self.n_past = min(self.n_past, n)

    def decode(self, tokens: Sequence[int], *, outputs: str = "last") -> None:
        """Evaluate tokens (at most n_ubatch) at the next positions. outputs: "last", "all" or "none"."""
        n = len(tokens)
        if not 0 < n <= self.settings.n_ubatch:
            raise ValueError(f"decode takes 1..{self.settings.n_ubatch} tokens, got {n}")
        if self.n_past + n > self.n_ctx:
            raise PawError(f"{self.model.path}: {self.n_past + n} tokens do not fit the context of {self.n_ctx}")
        b = self._batch
        b.n_tokens = n
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = outputs == "all" or (outputs == "last" and i == n - 1)
        lib = self._lib
        with interrupts.deferred() as interrupted:  # the evaluation callback runs Python inside the call
            abortable = interrupted is not interrupts.never
            if abortable:  # a Ctrl-C aborts the evaluation at the next graph node (llama_decode returns 2)
                self._interrupted = interrupted
                lib.llama_set_abort_callback(self._ctx, self._abort, None)
            try:
                rc = lib.llama_decode(self._ctx, b)
                if rc == 0:  # evaluated, even if a Ctrl-C arrived after the last node: positions taken
                    self.n_past += n
            finally:
                if abortable:
                    lib.llama_set_abort_callback(self._ctx, ctypes.cast(None, lib.ggml_abort_callback), None)
                    self._interrupted = interrupts.never
        if rc != 0:
            raise PawError(f"{self.model.path}: llama_decode failed with code {rc} at positions {self.n_past}..{self.n_past + n - 1}")

    def logits(self, i: int = -1) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self._ctx, i)
        if not ptr:
            raise PawError(f"{self.model.path}: no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def embeddings(self, i: int) -> np.ndarray:
        """The output after the final norm for batch index i of the last decode (a copy)."""
        ptr = self._lib.llama_get_embeddings_ith(self._ctx, i)
        if not ptr:
            raise PawError(f"{self.model.path}: no embeddings for batch index {i} (embeddings were not enabled)")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).copy()

    def state(self) -> bytes:
        size = self._lib.llama_state_seq_get_size(self._ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = self._lib.llama_state_seq_get_data(self._ctx, buf, size, 0)
        return bytes(buf[:n])

    def load_state(self, data: bytes, n_past: int) -> bool:
        self.truncate(0)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ok = self._lib.llama_state_seq_set_data(self._ctx, buf, len(data), 0) > 0
        self.n_past = n_past if ok else 0
        if not ok:
            self.truncate(0)
        return ok


# -- reading graph tensors in the evaluation callback --------------------------------------------


class _GGML:
    """The few libggml-base functions the callback needs (llama_cpp does not bind them)."""

    def __init__(self):
        llama_cpp = require("llama_cpp", "compile")
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        names = {"win32": ["ggml-base.dll"], "darwin": ["libggml-base.dylib"]}.get(sys.platform, ["libggml-base.so"])
        candidates = [lib_dir / n for n in names if (lib_dir / n).exists()]
        if not candidates:
            raise PawError(f"{lib_dir}: libggml-base is not there; this llama-cpp-python build is not supported")
        lib = ctypes.CDLL(str(candidates[0]))
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_get_name.restype = ctypes.c_char_p
        lib.ggml_nelements.argtypes = [ctypes.c_void_p]
        lib.ggml_nelements.restype = ctypes.c_int64
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
        lib.ggml_is_contiguous.restype = ctypes.c_bool
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_backend_tensor_get.restype = None
        self.lib = lib

    def name(self, t: int) -> str:
        return self.lib.ggml_get_name(t).decode("utf-8", errors="replace")

    def rows_f32(self, t: int, width: int) -> np.ndarray:
        """A contiguous F32 tensor of `width`-wide rows as a fresh (rows, width) array."""
        n = self.lib.ggml_nelements(t)
        if not self.lib.ggml_is_contiguous(t) or self.lib.ggml_nbytes(t) != 4 * n or n % width:
            raise PawError(f"graph tensor {self.name(t)} is not a contiguous F32 tensor of rows of {width}")
        out = np.empty((n // width, width), dtype=np.float32)
        self.lib.ggml_backend_tensor_get(t, out.ctypes.data, 0, 4 * n)
        return out


_GGML_SINGLETON: _GGML | None = None


def ggml() -> _GGML:
    global _GGML_SINGLETON
    if _GGML_SINGLETON is None:
        _GGML_SINGLETON = _GGML()
    return _GGML_SINGLETON


class LayerCapture:
    """A `cb_eval` callback that copies the outputs of chosen layers (`l_out-{i}`) while `active`,
    and, with on_layer, reports each layer output of every evaluation as it is computed (asking
    for them splits the graph at each layer: no measurable cost, 303 against 309 ms for the
    encoder pass of 336 tokens on the 4-layer test model, medians of 8).

    Exceptions cannot cross the C boundary: the first one is kept and re-raised by `check()`."""

    def __init__(self, layers: Sequence[int], width: int, n_layer: int = 0,
                 on_layer: Callable[[int], None] | None = None):
        self._wanted = {f"l_out-{i}": i for i in layers}
        self._layers = {f"l_out-{i}": i for i in range(n_layer)} if on_layer is not None else {}
        self._on_layer = on_layer
        self._width = width
        self._ggml = ggml()
        self.active = False
        self.got: dict[int, np.ndarray] = {}
        self._error: BaseException | None = None
        self._caller_error: BaseException | None = None  # raised by on_layer, not by the capture

    def __call__(self, tensor: int, ask: bool, user_data: int) -> bool:
        try:
            if self._error is not None or not (self.active or self._layers):
                return False if ask else True
            name = self._ggml.name(tensor)
            if ask:
                return name in self._layers or (self.active and name in self._wanted)
            if self.active and name in self._wanted:
                self.got[self._wanted[name]] = self._ggml.rows_f32(tensor, self._width)
            if name in self._layers:
                try:
                    self._on_layer(self._layers[name])
                except Exception as exc:  # noqa: BLE001 - the caller's own error: re-raised as it is
                    self._error = self._caller_error = exc
            return True
        except BaseException as exc:  # noqa: BLE001 - stored, re-raised by check()
            self._error = exc
            return False if ask else True

    def take(self) -> dict[int, np.ndarray]:
        """The rows captured by the last decode, by layer; clears them."""
        self.check()
        got, self.got = self.got, {}
        return got

    def check(self) -> None:
        error = self._error
        if error is not None and (isinstance(error, KeyboardInterrupt) or error is self._caller_error):
            self._error = self._caller_error = None  # a Ctrl-C, or on_layer's own error: not a capture failure
            raise error
        if self._error is not None:
            raise PawError(f"reading layer outputs from llama.cpp failed: {self._error}") from self._error
