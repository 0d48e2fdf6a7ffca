"""fn.map's work over worker threads: how many workers, how many sequences each keeps in flight,
and the pool that runs them. NumPy releases the GIL in its loops and BLAS calls, so one engine
per thread (the function's own and forks of it) shares the cores; BLAS is held at one thread
meanwhile (`blas_threads`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

from . import blas_threads
from .engine import Engine, Sequence, Stopped, own_positions
from .scheduler import EOS, PackedForward

# fn.map's default sequences in flight, shared among the worker threads (one per core): each holds
# its own keys and values (74 KB per token on GPT-2 124M: 128 x 50 tokens = 470 MB) besides the
# model's 500 MB. Fewer per worker leaves its decoding matmuls too small to run at full speed:
# measured on 2 cores (256 calls, 37-token prompts, 8 output tokens), 64 in flight cost 15-20% more
# CPU time per call than 128, for 210 MB less peak memory (920 MB against 1130 MB).
DEFAULT_BATCH_SIZE = 128
# The most memory fn.map's in-flight keys and values may take, all workers together: long inputs
# run fewer at a time rather than past it (128 inputs of 1,800 tokens would want 16 GB).
MAP_KV_BUDGET = 1 << 30
_MIN_PER_WORKER = 4  # fewer inputs than this per core run on one worker: threads would not pay off
_PIECES_PER_CAPACITY = 8  # a worker's piece of a map: long enough that its last, emptying steps are rare


class MapPool:
    """The engines a function's maps run on: its own, and forks of it made as more workers are
    asked for (the same weights, buffers of their own), kept for the next map."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.forks: list[Engine] = []

    def generate(self, seqs: list[Sequence | None], eos: EOS, batch_size: int, workers: int | None,
                 on_done: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
        """Greedy output ids of every sequence ([] for None). batch_size bounds the sequences in
        flight (and so the memory), whatever the worker count; workers None: one per core.
        on_done(i, ids) as sequence i finishes; calls never overlap."""
        outs: list[list[int]] = [[] for _ in seqs]
        # Similar lengths batched together waste less attention padding; the order does not change results.
        todo = sorted((i for i, s in enumerate(seqs) if s is not None), key=lambda i: len(seqs[i].ids))
        if not todo:
            return outs
        report = None if on_done is None else _one_at_a_time(on_done)
        for engine in (self.engine, *self.forks):
            engine.release_solo_cache()  # the map's caches replace it: peak memory is one of them, not both
        wanted = blas_threads.map_workers() if workers is None else workers
        n_workers = min(wanted, batch_size, -(-len(todo) // _MIN_PER_WORKER))
        capacity = min(batch_size // n_workers, kv_capacity([seqs[i] for i in todo], n_workers,
                                                             self.engine.model.kv_shape.bytes_per_position,
                                                             kv_budget(self.engine.model)))

        def work(engine: Engine, group: list[int], stop: threading.Event | None = None) -> None:
            done = None if report is None else (lambda k, ids: report(group[k], ids))
            for i, ids in zip(group, engine.generate([seqs[i] for i in group], eos, capacity, stop=stop,
                                                     on_done=done)):
                outs[i] = ids

        if n_workers == 1:
            work(self.engine, todo)
            return outs
        while len(self.forks) < n_workers - 1:
            self.forks.append(self.engine.fork())
        # Workers take turns at pieces of the work, so one that finishes early takes more.
        piece = min(_PIECES_PER_CAPACITY * capacity, -(-len(todo) // n_workers))
        pieces = [todo[p:p + piece] for p in range(0, len(todo), piece)]
        with blas_threads.single_threaded():
            run_workers([self.engine, *self.forks[:n_workers - 1]], pieces, work)
        return outs


def _one_at_a_time(callback: Callable[[int, list[int]], None]) -> Callable[[int, list[int]], None]:
    """The callback behind a lock: workers finish sequences at the same time, the caller's calls never overlap."""
    lock = threading.Lock()

    def call(i: int, ids: list[int]) -> None:
        with lock:
            callback(i, ids)

    return call


def kv_budget(model: PackedForward) -> int:
    """The bytes a map's (or a served batch's) keys and values may take on this model: MAP_KV_BUDGET,
    or less where the model says so (`map_kv_budget`, for a model whose weights leave less room)."""
    own = model.map_kv_budget
    return MAP_KV_BUDGET if own is None else min(MAP_KV_BUDGET, own)


def kv_capacity(seqs: list[Sequence], n_workers: int, bytes_per_position: int, budget: int) -> int:
    """Sequences in flight per worker that keep the map's keys and values within `budget` bytes,
    each slot sized as the engine sizes it, so long inputs run fewer at a time instead of
    asking for gigabytes. At least one, whatever the budget."""
    per_slot = own_positions(seqs) * bytes_per_position
    return max(1, budget // (n_workers * per_slot))


def run_workers(engines: list[Engine], groups: list[list[int]],
                work: Callable[[Engine, list[int], threading.Event], None]) -> None:
    """Each engine in its own thread (the first in this one) takes the next group until none are
    left. The first error (a Ctrl-C lands in this thread's) sets the event `work` gets, which
    stops the others within one step, and is raised here."""
    pending = iter(groups)
    take = threading.Lock()
    failed = threading.Event()

    def worker(engine: Engine) -> None:
        while not failed.is_set():
            with take:
                group = next(pending, None)
            if group is None:
                return
            try:
                work(engine, group, failed)
            except Stopped:  # another worker failed: its error is the one raised
                return
            except BaseException:
                failed.set()  # the others stop at their next step (a Ctrl-C waited for whole groups)
                raise

    with ThreadPoolExecutor(max_workers=len(engines) - 1, thread_name_prefix="paw-map") as pool:
        others = [pool.submit(worker, engine) for engine in engines[1:]]
        try:
            worker(engines[0])
            wait(others)
        except BaseException:  # also a Ctrl-C while this thread waits for the others' last groups
            failed.set()
            raise
        finally:
            wait(others)  # no worker outlives the call
        for future in others:
            future.result()
