"""`paw-lite run PROGRAM --input-file FILE --scheduler ADDRESS`: a batch run whose partitions run on
a Dask cluster.

The command line's batch run (`paw_lite.cli.run`) reads the inputs, resumes the output file and
writes the summary as it does locally; only running the pending inputs differs. Each partition
runs on a worker through the same `run_batch` as a local run (the same checks, the same error
records, the same `fn.map`) and comes back as its records; this process, the only writer, appends
them to the output in input order. A worker that dies mid-partition (killed, out of memory) has
its partition run again elsewhere by the scheduler: its records arrive once, from the run that
finished, so every input gets exactly one record."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .. import batch_files as batch
from ..constraints import OutputConstraint
from ..errors import IncompatibleModelError, PawError, require
from . import worker
from .shipping import MapOptions, ShippedProgram, options, ship

# Inputs per partition: a task each. A partition costs 25-90 ms of a worker besides its compute
# (scheduling, sending its inputs and records; benchmarks/dask_bench.py, docs/dask.md), and an input
# ~90 ms of one worker thread with the full-size interpreter and 8-token outputs: from ~32 inputs on
# that is under 5%, at 256 under 0.5%. Larger partitions would only coarsen the progress bar, lose
# more work to a killed worker and leave workers idle at the end of a run; within a partition
# inputs run --batch-size at a time, as locally.
DEFAULT_PARTITION_SIZE = 256
# Partitions sent to the cluster but not yet written, per worker thread: enough that no worker waits
# for its next task, few enough that the client does not hold a whole input file's tasks at once.
_IN_FLIGHT_PER_THREAD = 2
# How long a scheduler may take to answer, and to have a first worker.
_CONNECT_TIMEOUT_S = 30
_WORKER_TIMEOUT_S = 120


@dataclass(frozen=True)
class PartitionRecords:
    """A partition's records, and which function (see `PawFunction.fingerprint`) made them where."""

    records: list[dict]
    fingerprint: str
    worker: str


def run_items(items: list[batch.BatchItem], shipped: ShippedProgram, opts: MapOptions, run: str) -> PartitionRecords:
    """On a worker: a partition's records, made as a local batch run makes them."""
    fn = worker.loaded_function(shipped, opts)
    records: list[dict] = []
    # errors="return": a cut constrained output is its input's error record, as in a local run.
    batch.run_batch(items, lambda texts, on_output: fn.map(texts, **opts.map_kwargs(), on_result=on_output,
                                                           errors="return"),
                    records.append, chunk=opts.batch_size, run=run, check=fn.prompt_ids)
    return PartitionRecords(records, fn.fingerprint, str(worker.this_worker()))


def _identity(x):
    return x


# run_todo(items, write, run) -> (ok, failed): runs the pending items, writing one record each.
RunTodo = Callable[[list[batch.BatchItem], Callable[[dict], None], str], tuple[int, int]]


@contextmanager
def cluster_runner(args: argparse.Namespace, constraint: OutputConstraint | None = None) -> Iterator[tuple[str, RunTodo]]:
    """(the fingerprint of the function the workers run, how to run pending items on them), for the
    run command's options; the cluster connection (or a LocalCluster it started) is closed after.
    A constraint the workers' interpreter cannot compile raises its ConstraintError here, before
    any partition runs."""
    shipped = ship(args.program)  # a bad program fails here, before any cluster starts
    opts = options(args.max_tokens, args.batch_size, args.base_model,
                   **({} if constraint is None else constraint.describe()))  # choices=, regex= or json_schema=
    size = args.partition_size or DEFAULT_PARTITION_SIZE
    with connect(args.scheduler) as client:
        # One task holds the program; partitions depend on it, so each worker receives it once, and a
        # worker that dies takes no copy the others cannot get again (unlike scattered data).
        program = client.submit(_identity, shipped, key=f"paw-lite-program-{shipped.digest[:16]}")
        fingerprint, first = client.submit(worker.describe, program, opts, pure=False).result()

        def run_todo(todo: list[batch.BatchItem], write: Callable[[dict], None], run: str) -> tuple[int, int]:
            return _run_partitions(client, program, opts, run, [todo[i:i + size] for i in range(0, len(todo), size)],
                                   write, (fingerprint, first))

        yield fingerprint, run_todo


def _run_partitions(client, program, opts: MapOptions, run: str, parts: list[list[batch.BatchItem]],
                    write: Callable[[dict], None], expected: tuple[str, str]) -> tuple[int, int]:
    """Submit the partitions (a bounded number at a time), write their records in input order as
    they arrive. On an error or Ctrl-C, the partitions that finished are written too (then out of
    order: a rerun resumes from them) before it is raised."""
    from distributed import KilledWorker, as_completed
    from tqdm import tqdm

    counts = {"ok": 0, "failed": 0}
    finished: dict[int, PartitionRecords] = {}
    index: dict[str, int] = {}
    arrived = as_completed()
    submitted = written = 0
    token = uuid.uuid4().hex[:12]  # task keys of this run alone: another run's on the same cluster are other tasks

    def write_part(part: PartitionRecords) -> None:
        for record in part.records:
            write(record)
            counts["failed" if "error" in record else "ok"] += 1

    with tqdm(total=len(parts), desc="partitions", unit="partition", file=sys.stderr, disable=None) as bar:
        try:
            while written < len(parts):
                if submitted < len(parts):
                    window = max(2, _IN_FLIGHT_PER_THREAD * sum(client.nthreads().values()))
                    while submitted < len(parts) and submitted - written < window:
                        future = client.submit(run_items, parts[submitted], program, opts, run,
                                               key=f"paw-lite-partition-{token}-{submitted}")
                        index[future.key] = submitted
                        arrived.add(future)
                        submitted += 1
                # The earliest unwritten partition has not arrived (it would have been written), so
                # something is in flight to wait for.
                future = next(arrived)
                try:
                    part = future.result()  # a worker's PawError (no interpreter there, ...) is raised here
                except KilledWorker:
                    first = parts[index[future.key]][0].index + 1
                    raise PawError(f"the partition of inputs from line {first} on was given up by the scheduler: each "
                                   f"worker that ran it died (distributed.scheduler.allowed-failures times); out of "
                                   f"memory? Give workers more (dask worker --memory-limit) or lower --batch-size, then "
                                   f"rerun to resume") from None
                if part.fingerprint != expected[0]:
                    raise IncompatibleModelError(
                        f"{part.worker} runs another interpreter or program than {expected[1]} (function fingerprints "
                        f"{part.fingerprint[:12]} and {expected[0][:12]}): give every worker the same interpreter file "
                        f"(--base-model or PAW_LITE_MODELS); results of different interpreters are not mixed in one output")
                finished[index.pop(future.key)] = part
                bar.update(1)
                while written in finished:
                    write_part(finished.pop(written))
                    written += 1
        finally:
            for i in sorted(finished):  # only after an error: the loop writes everything otherwise
                write_part(finished.pop(i))
            for future in arrived.futures:  # not yet arrived: cancelled, so a Ctrl-C stops the cluster too
                future.cancel()
    return counts["ok"], counts["failed"]


@contextmanager
def connect(scheduler: str) -> Iterator[object]:
    """A distributed Client for --scheduler: `local:N` starts a LocalCluster of N single-threaded
    worker processes (`local`: one per core) for this run; anything else is a scheduler address."""
    require("distributed", "dask")
    from distributed import Client

    if scheduler == "local" or scheduler.startswith("local:"):
        with local_cluster(_local_workers(scheduler)) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        raise PawError(f"--scheduler {scheduler}: cannot reach a Dask scheduler there ({exc}); start one with `dask "
                       f"scheduler` and workers with `dask worker ADDRESS`, or use --scheduler local:N") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=_WORKER_TIMEOUT_S)
        except TimeoutError:
            raise PawError(f"--scheduler {scheduler}: no Dask worker joined in {_WORKER_TIMEOUT_S} s; start workers with "
                           f"`dask worker {scheduler}` (with PAW_LITE_MODELS set to a folder holding the interpreter)") from None
        yield client


def local_cluster(n_workers: int, threads_per_worker: int = 1):
    """A LocalCluster of worker processes for paw_lite: what `--scheduler local:N` runs on."""
    import dask
    from distributed import LocalCluster

    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=64 KiB (to hand memory back to the OS
    # sooner). Setting it turns off glibc's adaptive mmap threshold, so each of NumPy's large
    # temporaries in a decoding step is mapped and zeroed anew: 3-5% more CPU per input measured on
    # the full-size interpreter. The other variables (one thread for OpenMP and BLAS) stay; the
    # worker sets its BLAS threads itself (see worker._limit_blas).
    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        # The scheduler's HTTP server (dashboard, health) on a free port: its default, 8787, would
        # collide with another run's.
        return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                            dashboard_address=":0")


def _local_workers(scheduler: str) -> int:
    if scheduler == "local":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count = scheduler.removeprefix("local:")
    if not count.isdigit() or int(count) < 1:
        raise PawError(f"--scheduler {scheduler}: expected local:N with N the number of worker processes (at least 1), "
                       f"or a scheduler address such as tcp://HOST:8786")
    return int(count)
