"""K-quants through llama.cpp's own quantizer (`llama_model_quantize`, exposed by llama-cpp-python).

gguf-py cannot encode K-quants, and a NumPy copy of llama.cpp's mixed Q4_K_M recipe (which tensors
get Q6_K, which fall back) would drift from the real one; so the real one is called.

It runs in a child process. Quantizing a 4B model takes minutes in one native call that cannot be
stopped half-way from Python; a child can be killed at once on Ctrl-C, and it ends by itself when
its parent is killed. The child reports each tensor as llama.cpp starts it (parsed from llama.cpp's
log) as one JSON line on stdout."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from gguf import LlamaFileType

from paw_lite.atomic import atomic_path
from paw_lite.errors import InvalidFileError, require

log = logging.getLogger(__name__)

K_QUANTS: dict[str, LlamaFileType] = {
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}

# llama.cpp's quantizer logs "[  12/ 398]   blk.0.attn_q.weight - [ 2560,  4096, ...], type = ..."
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_STDERR_TAIL = 2000  # bytes of a crashed child's stderr read for its last line
# Run with -c, not -m: -m puts the working folder first on sys.path, where a stray gguf.py (or a
# source checkout's paw_lite/) would shadow the installed modules; the paw-lite command has no such entry.
_CHILD = ("import sys; del sys.path[0]; from paw_lite.convert.llama_quantize import _child_main; "
          "sys.exit(_child_main(sys.argv[1:]))")


def llama_quantize(src: str | os.PathLike[str], out: str | os.PathLike[str], qtype: str, nthread: int = 0,
                   on_tensor: Callable[[str, int, int], None] | None = None) -> Path:
    """Quantize a GGUF (F32/F16/BF16 matrices) to one of K_QUANTS with llama.cpp; written atomically.
    `on_tensor(name, index, count)` is called as llama.cpp starts each tensor (index from 1)."""
    require("llama_cpp", "compile")
    if qtype not in K_QUANTS:
        raise InvalidFileError(f"--type {qtype!r}: llama.cpp quantization here supports {', '.join(K_QUANTS)}")
    out = Path(out)
    with atomic_path(out) as tmp:
        _run_child(Path(src), Path(tmp), qtype, nthread or os.cpu_count() or 1, on_tensor)
    return out


def _run_child(src: Path, tmp: Path, qtype: str, nthread: int, on_tensor: Callable[[str, int, int], None] | None) -> None:
    cmd = [sys.executable, "-c", _CHILD, str(src), str(tmp), qtype, str(nthread)]
    error = None
    with tempfile.TemporaryFile() as stderr:
        # The child's stdin is a pipe nothing is written to: it closes when this process ends,
        # however it ends (a kill included), and the child then exits too.
        child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                 text=True, encoding="utf-8", errors="replace")
        try:
            assert child.stdout is not None
            for line in child.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # not ours: a library printing to stdout
                if not isinstance(message, dict):
                    continue
                if "tensor" in message and on_tensor is not None:
                    on_tensor(str(message["tensor"]), int(message["index"]), int(message["count"]))
                elif "error" in message:
                    error = str(message["error"])
            rc = child.wait()
        except BaseException:  # Ctrl-C, or on_tensor raised: the child must not outlive this call
            child.kill()
            child.wait()
            raise
        finally:
            assert child.stdin is not None
            child.stdin.close()
        if rc != 0 and error is None:  # killed, or crashed in native code
            stderr.seek(0, os.SEEK_END)
            stderr.seek(max(0, stderr.tell() - _STDERR_TAIL))
            tail = stderr.read().decode("utf-8", errors="replace").strip().splitlines()
            error = f"the quantizer process exited with status {rc}" + (f": {tail[-1]}" if tail else "")
    if error is not None:
        raise InvalidFileError(f"{src}: llama.cpp could not quantize it to {qtype.upper()}: {error}")


class _LogRelay:
    """In the child: llama.cpp's log lines to the parent as tensor progress, the last ones kept so a
    failure can be reported in one line instead of pages of native output."""

    def __init__(self, llama_cpp):
        self.lines: list[str] = []

        def callback(level: int, text: bytes, _user_data) -> None:
            piece = text.decode("utf-8", errors="replace")
            self.lines = (self.lines + [piece])[-40:]
            match = _TENSOR_LINE.match(piece.strip())
            if match:
                print(json.dumps({"tensor": match.group(3), "index": int(match.group(1)),
                                  "count": int(match.group(2))}), flush=True)

        self.callback = llama_cpp.llama_log_callback(callback)  # kept alive while installed
        llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))

    def errors(self) -> str:
        lines = [ln.strip() for ln in "".join(self.lines).splitlines() if ln.strip()]
        hits = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
        return "; ".join(hits[-3:] or lines[-1:]) or "no log output"


def _exit_when_orphaned() -> None:
    """End at once when the parent's end of stdin closes: the parent is gone (killed, crashed), and
    minutes of quantizing into a file nobody will rename would follow."""
    while os.read(0, 4096):  # the raw fd: a thread blocked in sys.stdin's buffer aborts interpreter shutdown
        pass
    os._exit(1)


def _child_main(argv: list[str]) -> int:
    # The terminal's Ctrl-C reaches the whole process group: the parent handles it by killing this
    # process, which meanwhile must not die half-way through its own cleanup.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, daemon=True).start()
    src, tmp, qtype, nthread = argv
    import llama_cpp

    logs = _LogRelay(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(nthread)
    params.ftype = int(K_QUANTS[qtype])
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        print(json.dumps({"error": f"rc {rc}: {logs.errors()}"}), flush=True)
        return 1
    return 0
