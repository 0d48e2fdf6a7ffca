"""What runs inside a Dask worker process: load a program once, run partitions through `fn.map`.

Every function here is called by Dask on a worker (or, with a local scheduler, in the caller's
process) with a partition and the shipped program."""

from __future__ import annotations

import logging
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .. import paths
from ..errors import PawError
from ..runtime import PawFunction, function
from .shipping import MapOptions, ShippedProgram

log = logging.getLogger("paw_lite")

# Programs a worker process keeps loaded at once (each ~500 MB with GPT-2 124M: its own merged
# weights and base). Two lets a graph that alternates between two programs run without reloading.
MAX_LOADED = 2


@dataclass(frozen=True)
class WorkerInfo:
    """Who ran a task: error messages and result checks name it."""

    address: str  # the Dask worker's address, or "local" outside a distributed worker
    host: str
    nthreads: int | None  # the worker's task threads; None outside a distributed worker

    def __str__(self) -> str:
        return f"Dask worker {self.address} on {self.host}" if self.nthreads is not None else f"{self.host} (no Dask worker)"


def this_worker() -> WorkerInfo:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # the threaded or synchronous scheduler: the caller's own process
        return WorkerInfo("local", socket.gethostname(), None)
    return WorkerInfo(worker.address, socket.gethostname(), worker.state.nthreads)


class _LoadedFunctions:
    """The functions this process has loaded, keyed by what decides their outputs.

    This is the one piece of process-wide state in paw_lite, on purpose: a Dask worker runs many
    tasks (partitions of one map, and of later maps) in one long-lived process, tasks cannot hand
    objects to each other, and loading a program costs seconds (interpreter, LoRA merge, prefix).
    So the process keeps what it loaded, at most MAX_LOADED functions (least recently used dropped)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # a worker with several threads runs several tasks at once
        self._functions: OrderedDict[tuple[str, str], PawFunction] = OrderedDict()
        self._blas_limited = False

    def get(self, shipped: ShippedProgram, options: MapOptions) -> PawFunction:
        worker = this_worker()
        with self._lock:
            if not self._blas_limited and worker.nthreads is not None:
                _limit_blas(worker.nthreads)
                self._blas_limited = True
            try:
                interpreter = paths.resolve_interpreter(options.base_model, shipped.program().runtime_id)
                key = (shipped.digest, str(interpreter))
                fn = self._functions.get(key)
                if fn is None:
                    log.info("%s: loading %s on %s", worker, shipped.source, interpreter)
                    fn = function(shipped.program(), base_model=interpreter)
                    self._functions[key] = fn
                    while len(self._functions) > MAX_LOADED:
                        # Dropped, not closed: a task in another thread may still be mapping with it.
                        self._functions.popitem(last=False)
            except PawError as exc:  # a missing interpreter is a fact about this worker: say which
                raise type(exc)(f"on {worker}: {exc}") from None
            self._functions.move_to_end(key)
            return fn


_LOADED = _LoadedFunctions()


def _limit_blas(nthreads: int) -> None:
    """The BLAS library's thread count for this process: the worker's task thread count. Dask's
    nanny starts workers with OPENBLAS_NUM_THREADS=1, which would hold `fn.map` to one thread on a
    worker given several; without the nanny BLAS would start one thread per core in every worker
    process of a machine. `fn.map` then runs one engine thread per BLAS thread. Set for good: the
    process is a worker, there to run these tasks."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=nthreads, user_api="blas")
    log.info("BLAS threads set to %d, the worker's thread count", nthreads)


def loaded_function(shipped: ShippedProgram, options: MapOptions) -> PawFunction:
    return _LOADED.get(shipped, options)


def describe(shipped: ShippedProgram, options: MapOptions) -> tuple[str, str]:
    """(the fingerprint of the function a worker runs, the worker): loads the program there, and
    compiles the options' constraint (a map of no inputs does only that), so a bad one is refused
    before any partition runs."""
    fn = loaded_function(shipped, options)
    fn.map([], **options.map_kwargs())
    return fn.fingerprint, str(this_worker())


def run_texts(texts, shipped: ShippedProgram, options: MapOptions) -> list[str]:
    """A partition of a Dask Bag of texts: their outputs, in order."""
    return loaded_function(shipped, options).map(list(texts), **options.map_kwargs())


def run_series(part, shipped: ShippedProgram, options: MapOptions):
    """A partition of a Dask Series of texts: a Series of outputs on the same index."""
    import pandas as pd

    texts = part.tolist()
    for label, text in zip(part.index, texts):
        if not isinstance(text, str):  # NaN for a missing value: name the row, not "input 3 of the map"
            raise TypeError(f"paw_lite.dask.map: {part.name!r} at index {label!r} holds {text!r} "
                            f"({type(text).__name__}), not text; fill or drop missing values first "
                            f"(e.g. .fillna(''))")
    return pd.Series(run_texts(texts, shipped, options), index=part.index, name=part.name, dtype=output_dtype(part.dtype))


def output_dtype(input_dtype):
    """Outputs have the input column's dtype when it is a string dtype (dask makes text columns
    pyarrow strings), else object."""
    import pandas as pd

    return input_dtype if isinstance(input_dtype, pd.StringDtype) else object
