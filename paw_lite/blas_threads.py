"""The thread count of the BLAS library NumPy calls, through threadpoolctl.

`fn.map` runs one worker thread per core, each evaluating its own batch with single-threaded
BLAS: NumPy's elementwise work (softmax, GELU, layer norm) is single-threaded, so with one
worker it leaves a core idle for a third of a batch's time. Two workers over two-threaded BLAS
would oversubscribe the cores (OpenBLAS's threads spin while they wait), so the libraries' counts
are lowered for the duration and restored after. That count is process-wide by nature; this
module is the one place that changes it.

threadpoolctl finds the BLAS libraries loaded in the process (OpenBLAS as NumPy's wheels bundle
it, MKL, BLIS, FlexiBLAS); every one is held at one thread together. With none found,
`controller()` returns None and `fn.map` uses one worker; that is logged once. Finding them costs
about 1 ms, once per process; setting a count, 1 us."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy  # noqa: F401  (its BLAS must be loaded before threadpoolctl looks for it)
from threadpoolctl import OpenBLASController, ThreadpoolController

log = logging.getLogger(__name__)


class BlasController:
    """The BLAS libraries of this process, set and read together."""

    def __init__(self, libraries: list):
        self._libraries = libraries  # threadpoolctl LibController objects

    @property
    def library(self) -> str:
        """Where the libraries live, for reports (`paw-lite doctor`)."""
        return ", ".join(lib.filepath for lib in self._libraries)

    def get(self) -> int:
        """Threads BLAS uses: the largest count among the libraries."""
        return max(lib.num_threads for lib in self._libraries)

    def set(self, n: int) -> None:
        self.restore([int(n)] * len(self._libraries))

    def counts(self) -> list[int]:
        return [lib.num_threads for lib in self._libraries]

    def restore(self, counts: list[int]) -> None:
        for lib, n in zip(self._libraries, counts):
            _release_openblas()
            lib.set_num_threads(n)
        _release_openblas()


def _release_openblas() -> None:
    """threadpoolctl (3.8) lets only the thread that last set OpenBLAS's count set it again and
    silently ignores the others, so a map run from another thread than one that once set the
    count would leave BLAS at full threads under its workers (tests/test_blas_threads.py caught
    it). paw_lite serialises its own changes (`_lock`) and may restore from another thread than
    the one that lowered the count, so it releases that control around each change."""
    release = getattr(OpenBLASController, "clear_controlling_thread", None)  # absent before threadpoolctl 3.8
    if release is not None:
        release(force=True)


@functools.cache
def controller() -> BlasController | None:
    """The BLAS NumPy uses, or None (logged once) when threadpoolctl finds none."""
    libraries = ThreadpoolController().select(user_api="blas").lib_controllers
    if not libraries:
        log.info("threadpoolctl finds no BLAS library NumPy uses; fn.map runs one worker")
        return None
    return BlasController(libraries)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_lock = threading.Lock()
_holders = 0
_saved: list[int] = []


@contextmanager
def single_threaded() -> Iterator[None]:
    """BLAS on one thread inside the block; the previous counts are restored when the last of
    any overlapping blocks (several functions mapping at once) exits."""
    global _holders, _saved
    ctl = controller()
    if ctl is None:
        yield
        return
    with _lock:
        if _holders == 0:
            _saved = ctl.counts()
            ctl.set(1)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                ctl.restore(_saved)


def map_workers() -> int:
    """Worker threads fn.map can use: one per core BLAS would otherwise use, 1 when BLAS cannot be controlled."""
    ctl = controller()
    if ctl is None:
        return 1
    with _lock:
        blas = max(_saved) if _holders else ctl.get()
    return max(1, min(usable_cpus(), blas))
