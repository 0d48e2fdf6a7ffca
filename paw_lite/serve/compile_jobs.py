"""Compile jobs for the PAW API: a queue run one job at a time on a worker thread, each job's
progress as the compiler reports it, and an index so the same compile request is answered from
disk instead of being compiled again (across restarts too).

A compile loads 4B models and takes every core for about a minute and a half; two at once would
only fight over memory and cores, so the queue is strictly one at a time (as the public
reimplementation avra-m3/program-as-weights-server does). The worker thread exists only while jobs
are queued: nothing runs, and nothing needs stopping, when the queue is empty.

A stopped server does not lose its queue: each queued or running job is recorded in
`data_dir/compile_pending/<job id>.json` until it ends, and `resume()` (at the next start) queues
those jobs again under their ids, so a client still polling one sees it finish. A compile cut off
by the stop starts over.

Identity: a request's compile inputs (the spec, what identifies the compiler, the pseudo compiler
and the interpreter files, and the compile options) are hashed into a key; `data_dir/compile_index/
<key>.json` names the program the key gave, and the program itself is `data_dir/compiled/
<program id>.paw` (the program id is paw_lite's content address, `paw_lite.program.content_program_id`)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, remove_stale_temporaries
from ..compiler.config import CompilerMeta, ModelFiles
# _runtime_id: the runtime a compiled program will name, decided as the pipeline decides it (one rule, not a copy)
from ..compiler.pipeline import CompileOptions, _family, _runtime_id, compiler_fingerprint, compile_program
from ..compiler.prompt_cache import file_identity
from ..errors import IncompatibleModelError, PawError
from ..families import COMPACT, FAMILIES, Family

log = logging.getLogger("paw_lite.serve")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
PROGRAM_ID = re.compile(r"^[0-9a-f]{16,64}$")  # the official SDK's program id (cache._PROGRAM_ID_RE)
KEY_VERSION = 1  # bump when what a key hashes changes meaning
KEPT_FINISHED_JOBS = 1000  # finished jobs remembered for status polls; older ones are forgotten
MAX_PENDING_RECORD_BYTES = 4 << 20  # a pending job's record: its spec and a few names
COMPILER_KIND = "finetune"  # the official client's word for a trained compiler (client.compile_async)

# Progress: each phase's share of a whole compile (measured on the real models: the pseudo-program
# and the encoder pass take nearly all of the time), for a percentage a client can show.
PHASE_WEIGHTS = {"check": 2.0, "pseudo-program": 45.0, "encoder": 45.0, "mapper": 5.0, "bundle": 3.0}


class CompileRequestError(PawError, ValueError):
    """A compile request this server cannot take."""


class NoCompilerError(CompileRequestError):
    """This server has no compiler (its files are missing or broken)."""


class UnknownCompilerError(CompileRequestError):
    """The request names a compiler this server does not have."""


class UnknownJobError(PawError, LookupError):
    """No compile job has this id."""


class JobStartedError(PawError):
    """A job that already started cannot be cancelled."""


@dataclass(frozen=True)
class Compiler:
    """A compiler this server has (one per program family at most): its files and what names and
    identifies it."""

    family: Family
    name: str
    snapshot: str | None
    files: ModelFiles  # resolved: every path exists
    fingerprint: str
    runtime_id: str
    identity: str  # hashes the compiler fingerprint and the pseudo compiler's and interpreter's file identities

    def answers_to(self, requested: str) -> bool:
        """Whether a request's `compiler` value names this compiler: its name, its family's published
        compiler name (paw-4b-gpt2, paw-4b-qwen3-0.6b), its compiler file's stem, or its fingerprint."""
        return requested in self.names()

    def names(self) -> list[str]:
        """Every name it answers to, its own first."""
        names = [self.name, self.family.compiler, Path(self.files.compiler).stem, self.fingerprint]
        return [n for i, n in enumerate(names) if n not in names[:i]]

    def describe(self, default: bool = True) -> dict[str, Any]:
        return {"name": self.name, "snapshot": self.snapshot, "kind": COMPILER_KIND,
                "interpreter": self.family.interpreter, "family": self.family.name, "runtime_id": self.runtime_id,
                "fingerprint": self.fingerprint, "default": default, "aliases": self.names()[1:]}


def find_compiler(files: ModelFiles, models_dir: Path | None, options: CompileOptions, family: Family) -> Compiler:
    """The compiler of `family` the files name (or the models directory holds), as `paw-lite compile
    --family` picks them; a pseudo compiler is needed, since requests carry a spec only."""
    resolved = files.resolved(models_dir, need_pseudo_compiler=True, family=family.name)
    meta = CompilerMeta.load(resolved.compiler_meta)
    named = meta.family()
    if named is not None and named != family:
        raise IncompatibleModelError(f"{resolved.compiler_meta}: a compiler for {named.name} programs "
                                     f"(interpreter_model {meta.interpreter_model!r}) among the {family.name} files")
    fingerprint = compiler_fingerprint(resolved)
    identity = hashlib.sha256(json.dumps(
        [fingerprint, file_identity(resolved.pseudo_compiler), file_identity(resolved.interpreter)]).encode()).hexdigest()
    name = meta.snapshot or Path(resolved.compiler).stem
    return Compiler(family=family, name=name, snapshot=meta.snapshot, files=resolved, fingerprint=fingerprint,
                    runtime_id=_runtime_id(resolved.interpreter, options, family), identity=identity)


def compile_key(spec: str, compiler: Compiler, options: CompileOptions) -> str:
    """What a compile request is, as a hash: equal keys give the same program."""
    what = {"version": KEY_VERSION, "spec": spec, "compiler": compiler.identity, "adapter_type": options.adapter_type,
            "max_new_tokens": options.max_new_tokens, "input_reserve": options.input_reserve,
            "runtime_id": compiler.runtime_id}
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Job:
    """One compile request in the queue. Fields change on the worker thread; read them through
    `CompileJobs.status` (a snapshot under the lock)."""

    job_id: str
    key: str
    spec: str
    compiler: Compiler | None  # None only for a resumed job whose compiler this server lacks (failed)
    status: str = "queued"  # queued -> running -> done | failed; queued -> cancelled
    stage: str | None = None
    done: int | None = None  # the stage's count (pseudo-program tokens, encoder token-layers)
    total: int | None = None
    unit: str | None = None
    percent: float = 0.0
    phases: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    program_id: str | None = None
    pseudo_program: str | None = None
    pseudo_program_strategy: str | None = None
    error: str | None = None
    input_error: bool = False  # the failure is the request's (a spec the compiler refuses), not the server's
    cached: bool = False  # answered from the index, without a compile
    created_at: str = dataclasses.field(default_factory=_now)
    started_at: str | None = None
    completed_at: str | None = None
    seconds: float | None = None
    finished: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = dataclasses.field(default_factory=list, repr=False)


class CompileJobs:
    """The server's compile queue and the index of what it compiled.

    files / models_dir: the compiler's files, as `paw-lite compile` takes them.
    options: the compile options every job uses (adapter type, pseudo-program length, threads).
    on_update(status): called on the worker thread after each progress report, with the job's
    status; a hook for logs and for tests (a hook that blocks holds the compile there)."""

    def __init__(self, data_dir: Path, files: ModelFiles = ModelFiles(), models_dir: Path | None = None,
                 options: CompileOptions = CompileOptions(), *,
                 on_update: Callable[[dict[str, Any]], None] | None = None):
        self.data_dir = Path(data_dir)
        self.files, self.models_dir, self.options = files, models_dir, options
        self.on_update = on_update
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: list[Job] = []
        self._by_key: dict[str, Job] = {}  # queued or running jobs, so a second request joins the first
        self._worker: threading.Thread | None = None
        self._compilers: dict[str, Compiler] = {}  # by family name: found ones (failures are not kept)
        self._compiler_lock = threading.Lock()
        self.compiles = 0  # compiles started by this object (the tests count them)
        # what a server killed mid-write left behind
        for folder in (self.compiled_dir, self.index_dir, self.pending_dir):
            remove_stale_temporaries(folder)

    @property
    def compiled_dir(self) -> Path:
        return self.data_dir / "compiled"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "compile_index"

    @property
    def pending_dir(self) -> Path:
        return self.data_dir / "compile_pending"

    # -- the compiler ---------------------------------------------------------------------------

    def _explicit_family(self) -> str:
        """The family the files given by name (--compiler ..., --family) are for, as `paw-lite
        compile` decides it: the other family's compiler is looked for in the models directory only."""
        try:
            return _family(self.options, self.files).name
        except PawError:  # a broken meta.json given: its compile reports it, with the files of that family
            return COMPACT.name

    def compilers(self) -> tuple[list[Compiler], dict[str, str]]:
        """The compilers this server has, the default first (the family `paw-lite compile` picks
        when both are there, as it does without --family), and why each other family has none.
        Each is found once (its files are hashed then); a failure is not kept, so files put in
        place later are found on the next request."""
        explicit = self._explicit_family()
        found, missing = [], {}
        with self._compiler_lock:
            for name, family in FAMILIES.items():
                if name not in self._compilers:
                    files = self.files if name == explicit else ModelFiles()
                    try:
                        self._compilers[name] = find_compiler(files, self.models_dir, self.options, family)
                    except PawError as exc:
                        missing[name] = str(exc)
                        continue
                found.append(self._compilers[name])
        found.sort(key=lambda c: c.family.name != explicit)
        return found, missing

    def compiler(self) -> Compiler:
        """The default compiler, or NoCompilerError saying which files are missing."""
        return self.pick(None)

    def pick(self, requested: str | None) -> Compiler:
        """The compiler a request names (None: the default), or CompileRequestError naming what there is."""
        found, missing = self.compilers()
        if not found:
            raise NoCompilerError("this server cannot compile: " + "; ".join(missing.values()))
        if requested is None:
            return found[0]
        for compiler in found:
            if compiler.answers_to(requested):
                return compiler
        have = "; ".join(", ".join(repr(n) for n in c.names()[:2]) + f" ({c.family.name} programs)" for c in found)
        hint = "".join(f"; the {FAMILIES[f].compiler} compiler is not here: {why}" for f, why in missing.items()
                       if requested == FAMILIES[f].compiler)
        raise UnknownCompilerError(f"compiler {requested[:80]!r} is not on this server; it has {have} "
                                  f"(GET /api/v1/models/compilers lists them), or omit 'compiler'{hint}")

    # -- the index ------------------------------------------------------------------------------

    def cached_program(self, key: str) -> str | None:
        """The program id a key already gave, if its program is still in `compiled/`."""
        try:
            record = json.loads((self.index_dir / f"{key}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        program_id = record.get("program_id") if isinstance(record, dict) else None
        if not isinstance(program_id, str) or not PROGRAM_ID.match(program_id):
            return None
        return program_id if (self.compiled_dir / f"{program_id}.paw").is_file() else None

    def program_path(self, program_id: str) -> Path | None:
        """`compiled/<program_id>.paw`, for a valid id of a program that is there."""
        if not PROGRAM_ID.match(program_id):
            return None
        path = self.compiled_dir / f"{program_id}.paw"
        return path if path.is_file() else None

    # -- jobs -----------------------------------------------------------------------------------

    def submit(self, spec: str, compiler: Compiler) -> Job:
        """The job for this request: a queued or running one compiling the same request (it joins
        it), a new queued one, or, when the request was compiled before, a job that is already done
        (`cached`), without a compile."""
        key = compile_key(spec, compiler, self.options)
        with self._lock:
            running = self._by_key.get(key)
            if running is not None:
                return running
            job = Job(job_id=secrets.token_hex(16), key=key, spec=spec, compiler=compiler)
            self._jobs[job.job_id] = job
            self._forget_old_jobs()
            program_id = self.cached_program(key)
            if program_id is not None:
                job.status, job.program_id, job.cached, job.percent = "done", program_id, True, 100.0
                job.started_at = job.completed_at = job.created_at
                job.finished.set()
                return job
            self._record_pending(job)
            self._enqueue(job)
        return job

    def _enqueue(self, job: Job) -> None:
        """Queue a job (under the lock), starting the worker if none runs."""
        self._by_key.setdefault(job.key, job)  # a resumed twin of a queued job does not take its place
        self._queue.append(job)
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="paw-lite-compile", daemon=True)
            self._worker.start()

    # -- jobs a stopped server left -------------------------------------------------------------

    def _record_pending(self, job: Job) -> None:
        """Write the job's record (before it is queued): what resume() needs to queue it again."""
        record = {"job_id": job.job_id, "spec": job.spec, "family": job.compiler.family.name,
                  "compiler": job.compiler.name, "created_at": job.created_at}
        with atomic_path(self.pending_dir / f"{job.job_id}.json") as tmp:
            tmp.write_text(json.dumps(record), encoding="utf-8")

    def _forget_pending(self, job: Job) -> None:
        (self.pending_dir / f"{job.job_id}.json").unlink(missing_ok=True)

    def resume(self) -> list[str]:
        """Queue again, oldest first and under their own ids, the jobs a stopped server left queued
        or running; returns their ids. A job whose program is in `compiled/` by now is done at once;
        one whose family's compiler this server lacks fails, saying so. An unreadable record is
        logged and removed."""
        records = []
        for path in sorted(self.pending_dir.glob("*.json")):
            record = _read_pending(path)
            if record is None:
                log.warning("%s: not a pending compile job's record; removed", path)
                path.unlink(missing_ok=True)
            else:
                records.append(record)
        records.sort(key=lambda r: r["created_at"])
        if not records:
            return []
        found, missing = self.compilers()
        resumed = []
        for record in records:
            compiler = next((c for c in found if c.family.name == record["family"]), None)
            job = Job(job_id=record["job_id"], key="", spec=record["spec"], compiler=compiler,
                      created_at=record["created_at"])
            with self._lock:
                if job.job_id in self._jobs:  # already known to this object: nothing to resume
                    continue
                self._jobs[job.job_id] = job
                resumed.append(job.job_id)
                if compiler is not None:  # the worker answers it from the index if it was compiled meanwhile
                    job.key = compile_key(job.spec, compiler, self.options)
                    self._enqueue(job)
                    continue
                why = missing.get(record["family"], f"no {record['family']} compiler")
                job.status, job.completed_at = "failed", _now()
                job.error = f"the server restarted without the compiler this job was for: {why}"
            self._forget_pending(job)
            self._finish(job)
        if resumed:
            log.info("resumed %d compile job(s) a stopped server left", len(resumed))
        return resumed

    def lookup(self, spec: str, compiler: Compiler) -> str | None:
        """The program id this request gave before, without queueing anything (a precheck)."""
        return self.cached_program(compile_key(spec, compiler, self.options))

    def job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise UnknownJobError(f"compile job {job_id[:80]!r} not found (finished jobs are kept in memory, the "
                                  f"last {KEPT_FINISHED_JOBS}: a restart forgets them)")
        return job

    def status(self, job_id: str) -> dict[str, Any]:
        job = self.job(job_id)
        with self._lock:
            return self._status(job)

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue) + sum(1 for j in self._by_key.values() if j.status == "running")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job; a running one raises JobStartedError (the client's word: HTTP 409)."""
        job = self.job(job_id)
        with self._lock:
            if job.status == "queued":
                self._queue.remove(job)
                if self._by_key.get(job.key) is job:
                    del self._by_key[job.key]
                job.status, job.completed_at = "cancelled", _now()
                self._forget_pending(job)
            elif job.status == "running":
                raise JobStartedError(f"compile job {job_id} is already running and cannot be cancelled")
            status = job.status
        self._finish(job)
        return {"job_id": job_id, "status": status}

    async def wait(self, job: Job) -> None:
        """Wait for a job to finish without holding a thread (a compile takes minutes)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if job.finished.is_set():
                return
            job._waiters.append((loop, future))
        await future

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None  # under the lock: a submit after this starts a new worker
                    return
                job = self._queue.pop(0)
                job.status, job.started_at = "running", _now()
            t0 = time.perf_counter()
            try:
                program_id = self.cached_program(job.key)  # a resumed job compiled before the stop, or a twin's
                if program_id is not None:
                    with self._lock:
                        job.cached = True
                    pseudo, strategy, phases = None, None, []
                else:
                    with self._lock:
                        self.compiles += 1
                    program_id, pseudo, strategy, phases = self._compile(job)
            except Exception as exc:  # the job's boundary: every failure is the job's error, the worker goes on
                message = str(exc) if isinstance(exc, PawError) else f"internal error: {type(exc).__name__}: {exc}"
                if not isinstance(exc, PawError):
                    log.exception("compile job %s failed", job.job_id)
                with self._lock:
                    job.status, job.error, job.input_error = "failed", message, isinstance(exc, PawError)
            else:
                with self._lock:
                    job.status, job.program_id, job.percent = "done", program_id, 100.0
                    job.pseudo_program, job.pseudo_program_strategy, job.phases = pseudo, strategy, phases
                    job.stage = job.done = job.total = job.unit = None
            with self._lock:
                job.completed_at, job.seconds = _now(), round(time.perf_counter() - t0, 3)
                if self._by_key.get(job.key) is job:  # not a twin resumed with the same key
                    del self._by_key[job.key]
            self._forget_pending(job)
            self._finish(job)
            self._report(job)

    def _compile(self, job: Job) -> tuple[str, str | None, str, list[dict[str, Any]]]:
        options = self.options

        def progress(message: str) -> None:  # the pipeline's phase lines: "<phase> ..." when one starts
            if message.endswith(" ..."):
                self._progress(job, stage=message[:-4], done=None, total=None, unit=None)

        def on_token(n: int) -> None:
            self._progress(job, stage="pseudo-program", done=n, total=options.max_new_tokens, unit="tokens")

        def on_encoder(done: int, total: int) -> None:
            self._progress(job, stage="encoder", done=done, total=total, unit="token-layers")

        options = dataclasses.replace(options, family=job.compiler.family.name)
        result = compile_program(job.spec, files=job.compiler.files, options=options, progress=progress,
                                 on_token=on_token, on_encoder=on_encoder)
        program = result.program
        program_id = program.program_id
        assert program_id is not None and PROGRAM_ID.match(program_id), program_id
        path = program.save(self.compiled_dir / f"{program_id}.paw")  # atomic: the store never sees half a file
        record = {"program_id": program_id, "spec": job.spec, "compiler": job.compiler.name, "created_at": _now(),
                  "program": path.name}
        with atomic_path(self.index_dir / f"{job.key}.json") as tmp:  # after the program: the index never names a missing file
            tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        return program_id, program.pseudo_program, program.meta["pseudo_program_strategy"], result.phases

    def _progress(self, job: Job, *, stage: str, done: int | None, total: int | None, unit: str | None) -> None:
        with self._lock:
            job.stage, job.done, job.total, job.unit = stage, done, total, unit
            job.percent = round(_percent(stage, done, total), 1)
        self._report(job)

    def _report(self, job: Job) -> None:
        if self.on_update is not None:
            with self._lock:
                status = self._status(job)
            self.on_update(status)

    def _finish(self, job: Job) -> None:
        with self._lock:
            if job.finished.is_set():
                return
            job.finished.set()
            waiters, job._waiters = job._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)

    def _forget_old_jobs(self) -> None:
        finished = [jid for jid, j in self._jobs.items() if j.status in ("done", "failed", "cancelled")]
        for jid in finished[:max(0, len(finished) - KEPT_FINISHED_JOBS)]:
            del self._jobs[jid]

    def _status(self, job: Job) -> dict[str, Any]:
        """The job as the official client's CompileStatus has it (client.py), plus progress fields."""
        return {
            "job_id": job.job_id, "status": job.status, "program_id": job.program_id,
            "compiler_snapshot": None if job.compiler is None else job.compiler.snapshot or job.compiler.name,
            "compiler_kind": COMPILER_KIND,
            "error": job.error, "created_at": job.created_at, "started_at": job.started_at,
            "completed_at": job.completed_at, "percent": job.percent, "stage": job.stage,
            "progress": None if job.done is None else {"done": job.done, "total": job.total, "unit": job.unit},
            "pseudo_program": job.pseudo_program, "pseudo_program_strategy": job.pseudo_program_strategy,
            "runtime_id": None if job.compiler is None else job.compiler.runtime_id, "runtime_manifest_version": 1,
            "cached": job.cached,
            "queue_position": self._queue.index(job) + 1 if job in self._queue else None,
            "queue_length": len(self._queue), "estimated_wait_s": None,
            "timings": {"total_s": job.seconds, "phases": job.phases} if job.seconds is not None else None,
            "slug": None, "version": None, "version_action": None,
        }


def _percent(stage: str, done: int | None, total: int | None) -> float:
    """How far a whole compile is: the phases before this one, and this one's fraction."""
    before, weight = 0.0, 0.0
    for name, w in PHASE_WEIGHTS.items():
        if name == stage:
            weight = w
            break
        before += w
    fraction = min(1.0, done / total) if done is not None and total else 0.0
    return 100.0 * (before + weight * fraction) / sum(PHASE_WEIGHTS.values())


def _read_pending(path: Path) -> dict[str, Any] | None:
    """A pending job's record, checked (size before reading, then every field), or None."""
    try:
        if path.stat().st_size > MAX_PENDING_RECORD_BYTES:
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fields = ("job_id", "spec", "family", "compiler", "created_at")
    if not isinstance(record, dict) or not all(isinstance(record.get(f), str) for f in fields):
        return None
    if not JOB_ID.match(record["job_id"]) or path.stem != record["job_id"] or record["family"] not in FAMILIES:
        return None
    return record


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
