"""K-quants through llama.cpp's own quantizer (`llama_model_quantize`, exposed by llama-cpp-python).

gguf-py cannot encode K-quants, and a NumPy copy of llama.cpp's mixed Q4_K_M recipe (which tensors
get Q6_K, which fall back) would drift from the real one; so the real one is called."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from gguf import LlamaFileType

from paw_lite import interrupts
from paw_lite.atomic import atomic_path
from paw_lite.errors import InvalidFileError, require

log = logging.getLogger(__name__)

K_QUANTS: dict[str, LlamaFileType] = {
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}


class _LogCapture:
    """Route llama.cpp's log lines to Python logging while quantizing and keep the last ones, so a
    failure can be reported in one line instead of pages of native output on stderr."""

    def __init__(self, llama_cpp):
        self.llama_cpp = llama_cpp
        self.lines: list[str] = []

        def callback(level: int, text: bytes, _user_data) -> None:
            line = text.decode("utf-8", errors="replace")
            self.lines = (self.lines + [line])[-40:]
            log.debug("llama.cpp: %s", line.rstrip())

        self._callback = llama_cpp.llama_log_callback(callback)  # kept alive while installed

    def __enter__(self) -> "_LogCapture":
        self.llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        from llama_cpp import _logger  # llama-cpp-python's own handler, installed when it is imported

        self.llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))

    def errors(self) -> str:
        lines = [ln.strip() for ln in "".join(self.lines).splitlines() if ln.strip()]
        hits = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
        return "; ".join(hits[-3:] or lines[-1:]) or "no log output"


def llama_quantize(src: str | os.PathLike[str], out: str | os.PathLike[str], qtype: str, nthread: int = 0) -> Path:
    """Quantize a GGUF (F32/F16/BF16 matrices) to one of K_QUANTS with llama.cpp; written atomically."""
    llama_cpp = require("llama_cpp", "compile")
    if qtype not in K_QUANTS:
        raise InvalidFileError(f"--type {qtype!r}: llama.cpp quantization here supports {', '.join(K_QUANTS)}")
    out = Path(out)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread or os.cpu_count() or 1
    params.ftype = int(K_QUANTS[qtype])
    # deferred: a Ctrl-C stops the conversion once llama.cpp returns (it cannot be stopped half-way),
    # with no output written, instead of being lost in the log callback
    with atomic_path(out) as tmp, _LogCapture(llama_cpp) as logs, interrupts.deferred():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise InvalidFileError(f"{src}: llama.cpp could not quantize it to {qtype.upper()} (rc {rc}): {logs.errors()}")
    return out
