"""Continuous batching across requests: one worker thread per served program owns the program's
engine while there is work, and steps one `scheduler.Batch` into which requests are fed as they
arrive. A new request joins the running batch at the next step (a free slot permitting), a
finished one leaves it, and a request whose client went away is dropped between steps. So calls
that arrive together share each evaluation (one prefix KV, packed rows), and a lone call is a
batch of one.

The event loop never waits on the engine: a route submits a `Job` and awaits its events, which
the worker hands over with `loop.call_soon_threadsafe` (tokens as they are made, then the end)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from ..errors import PawError
from ..parallel_map import kv_budget
from ..runtime import PawFunction, PreparedCall
from .settings import ServeSettings
from .store import ProgramStore

log = logging.getLogger("paw_lite.serve")


class WorkerClosedError(PawError):
    """The worker stopped (the server is shutting down, or its program was unloaded)."""


@dataclass(eq=False)  # compared and hashed by identity: a job is a batch key
class Job:
    """One input in a program's batch. Its events go to `events` (a queue on the job's event
    loop, which several jobs may share) as (job, kind, value): (job, "tokens", new_ids) as they
    are made (when `stream`), then (job, "done", ids) or (job, "error", exception)."""

    call: PreparedCall
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: int = 0  # the input's place in its request
    done: bool = False  # its "done" event was received (set on the event loop)

    def _post(self, kind: str, value: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self, kind, value))
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class ProgramWorker:
    """A program's batch worker. Its thread starts with the worker and sleeps while there is no
    work; it holds the function's engine only while a batch runs."""

    def __init__(self, name: str, fn: PawFunction, capacity: int):
        self.name = name
        self.fn = fn
        self.capacity = capacity
        self._cond = threading.Condition()
        self._new: list[Job] = []
        self._gone: list[Job] = []
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"paw-serve:{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if job.call.sequence is None:  # nothing to evaluate: done at once
            job._post("done", [])
            return
        with self._cond:
            if self._closed:
                raise WorkerClosedError(f"the worker of {self.name} has stopped (the server is shutting down, or "
                                        f"the program was unloaded)")
            self._new.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The job's client went away: drop it from the batch before the next step."""
        with self._cond:
            self._gone.append(job)
            self._cond.notify()

    def close(self) -> None:
        """Stop once the jobs already submitted are done."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # -- the worker thread ---------------------------------------------------------------------

    def _take(self, busy: bool) -> tuple[list[Job], list[Job]] | None:
        """New and cancelled jobs; waits for some while there is nothing to step. None: stop."""
        with self._cond:
            while not busy and not self._new and not self._closed:
                self._cond.wait()
            if not busy and not self._new and self._closed:
                return None
            new, self._new = self._new, []
            gone, self._gone = self._gone, []
            return new, gone

    def _work(self) -> None:
        while True:
            taken = self._take(busy=False)
            if taken is None:
                return
            try:
                with self.fn.engine() as engine:  # the busy period: until the batch empties
                    self._run_batch(engine, *taken)
            except BaseException as exc:  # a closed function, a bug: fail what was submitted, go on
                log.error("%s: batch worker failed", self.name, exc_info=exc)
                with self._cond:
                    failed, self._new = self._new, []
                for job in failed:
                    job._post("error", exc)

    def _run_batch(self, engine, new: list[Job], gone: list[Job]) -> None:
        eos = self.fn.tokenizer.eos_ids
        batch = engine.batch(self.capacity, eos, on_done=lambda job, ids: job._post("done", ids),
                             kv_budget=kv_budget(engine.model))
        try:
            while True:
                dropped = set(gone)
                for job in new:
                    if job not in dropped:
                        batch.add(job, job.call.sequence)
                for job in gone:
                    batch.drop(job)
                if not batch.busy:
                    return
                for job, tokens in batch.step():
                    if job.stream:
                        job._post("tokens", tokens)
                new, gone = self._take(busy=True)
        except BaseException as exc:
            for job in _keys(batch):
                job._post("error", exc)
            for job in new:
                job._post("error", exc)
            raise


def _keys(batch) -> list[Hashable]:
    return list(batch.seqs)


class Batchers:
    """The batch workers of a server's programs, made on a program's first request (and again
    for a program file that was replaced). At most `max_loaded` programs stay loaded: loading
    one more unloads the least recently used (its worker finishes the jobs it has, then stops;
    a request that raced it is retried by the route, `WorkerClosedError`)."""

    def __init__(self, store: ProgramStore, settings: ServeSettings):
        self.store = store
        self.capacity = settings.batch_size
        self.max_loaded = settings.max_loaded
        self._lock = threading.Lock()
        self._workers: OrderedDict[str, ProgramWorker] = OrderedDict()  # least recently used first
        self._closed = False

    def worker(self, name: str) -> ProgramWorker:
        """The worker of a program (loading the program on first use: call it off the event loop)."""
        fn = self.store.function(name)
        retired = []
        with self._lock:
            if self._closed:
                raise WorkerClosedError("the server is shutting down")
            worker = self._workers.get(name)
            if worker is None or worker.fn is not fn:
                if worker is not None:  # the file was replaced: the old program finishes its jobs, then stops
                    retired.append((worker, False))
                worker = ProgramWorker(name, fn, self.capacity)
                self._workers[name] = worker
            self._workers.move_to_end(name)
            while len(self._workers) > self.max_loaded:
                old_name, old = self._workers.popitem(last=False)
                self.store.unload(old_name, old.fn)  # a request from now on loads it again
                retired.append((old, True))
        for old, close_fn in retired:
            threading.Thread(target=_retire, args=(old, close_fn), name=f"paw-serve-retire:{old.name}",
                             daemon=True).start()
        return worker

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._workers = list(self._workers.values()), OrderedDict()
        for w in workers:
            w.close()


def _retire(worker: ProgramWorker, close_fn: bool) -> None:
    worker.close()  # after the jobs it has
    if close_fn:
        worker.fn.close()  # its merged weights are freed
