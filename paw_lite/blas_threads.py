"""The thread count of the BLAS library NumPy calls, when that library is OpenBLAS.

`fn.map` runs one worker thread per core, each evaluating its own batch with single-threaded
BLAS: NumPy's elementwise work (softmax, GELU, layer norm) is single-threaded, so with one
worker it leaves a core idle for a third of a batch's time. Two workers over two-threaded BLAS
would oversubscribe the cores (OpenBLAS's threads spin while they wait), so the library's count
is lowered for the duration and restored after. That count is process-wide by nature; this
module is the one place that changes it.

Only OpenBLAS is handled (NumPy's own wheels bundle it as scipy-openblas). With another BLAS,
or none found, `controller()` returns None and `fn.map` uses one worker; that is logged once."""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# (set, get) symbol pairs, most specific first: NumPy >= 2 wheels (64-bit ints, scipy_ prefix),
# their 32-bit-int variant, then a system OpenBLAS.
_SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


@dataclass(frozen=True)
class BlasController:
    library: str
    _set: ctypes._CFuncPtr
    _get: ctypes._CFuncPtr

    def get(self) -> int:
        return int(self._get())

    def set(self, n: int) -> None:
        self._set(int(n))


def _candidate_libraries() -> list[str]:
    """OpenBLAS libraries this process has loaded (Linux), else the ones NumPy's wheel bundles."""
    found: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # address, perms, offset, device, inode[, path]
                path = fields[5].strip() if len(fields) == 6 else ""
                if "openblas" in os.path.basename(path).lower() and path not in found:
                    found.append(path)
    except OSError:
        pass
    numpy_dir = Path(np.__file__).parent
    for bundled in (numpy_dir.parent / "numpy.libs", numpy_dir / ".dylibs"):  # Linux/Windows wheels, macOS wheels
        for path in sorted(glob.glob(str(bundled / "*openblas*"))):
            if path not in found:
                found.append(path)
    return found


@functools.cache
def controller() -> BlasController | None:
    """The OpenBLAS NumPy uses, or None (logged once) when it cannot be found."""
    for path in _candidate_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter.argtypes, getter.restype = [], ctypes.c_int
                return BlasController(path, setter, getter)
    log.info("NumPy's BLAS is not an OpenBLAS paw_lite can find; fn.map runs one worker")
    return None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_lock = threading.Lock()
_holders = 0
_saved = 0


@contextmanager
def single_threaded() -> Iterator[None]:
    """BLAS on one thread inside the block; the previous count is restored when the last of
    any overlapping blocks (several functions mapping at once) exits."""
    global _holders, _saved
    ctl = controller()
    if ctl is None:
        yield
        return
    with _lock:
        if _holders == 0:
            _saved = ctl.get()
            ctl.set(1)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                ctl.set(_saved)


def map_workers() -> int:
    """Worker threads fn.map can use: one per core BLAS would otherwise use, 1 when BLAS cannot be controlled."""
    ctl = controller()
    if ctl is None:
        return 1
    with _lock:
        blas = _saved if _holders else ctl.get()
    return max(1, min(usable_cpus(), blas))
