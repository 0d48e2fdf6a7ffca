"""The PAW REST API (`/api/v1/...`): what the official `programasweights` client (0.4.14, client.py
and cache.py) calls to compile a spec and to download and run a program, served from this machine.

Point the client at the server with `PAW_API_URL=http://127.0.0.1:8000` (and `PAW_API_KEY` when
the server has a key: the client sends it as `X-API-Key`). Compiles run paw_lite's CPU compiler
through `CompileJobs` (one at a time, in the background); the routes here only parse, validate and
answer. Errors are `{"detail": "..."}`, with the status codes the client acts on (404 with "not
found" for an unknown program: its download gives up at once instead of polling)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..compiler.pipeline import CompileOptions
from ..errors import ContextOverflowError, PawError
from ..families import FAMILIES
from ..program import Program
from .batching import Job as BatchJob
from .compile_jobs import (COMPILER_KIND, PROGRAM_ID, CompileJobs, Job, JobStartedError, NoCompilerError, UnknownCompilerError,
                           UnknownJobError)
from .errors import ApiError
from .runtimes import Runtimes, UnknownRuntimeError, models_dirs
from .slugs import SlugError, SlugTable, check_slug
from .store import UnknownProgramError

log = logging.getLogger("paw_lite.serve")

MAX_PAGE_SIZE = 100


class ProgramDirectory:
    """Program ids to files: `compiled/<id>.paw`, else a served program whose meta.json carries the
    id. meta.json is read once per file version (bounded reader: `Program.load`)."""

    def __init__(self, jobs: CompileJobs):
        self.jobs = jobs
        self._lock = threading.Lock()
        self._metas: dict[tuple[str, int, int], dict[str, Any] | None] = {}

    def meta(self, path: Path, mtime_ns: int, size: int) -> dict[str, Any] | None:
        key = (str(path), mtime_ns, size)
        with self._lock:
            if key in self._metas:
                return self._metas[key]
        try:
            meta: dict[str, Any] | None = dict(Program.load(path).meta)
        except PawError as exc:
            log.warning("not offered through the PAW API: %s", exc)
            meta = None
        with self._lock:
            self._metas[key] = meta
        return meta

    def entries(self, store) -> list[tuple[str, Path, dict[str, Any]]]:
        """(served name, path, meta) of every program of the store (`ProgramStore`) with an id the
        official client accepts."""
        out = []
        for f in store.files():
            meta = self.meta(f.path, f.mtime_ns, f.size)
            if meta is not None and isinstance(meta.get("program_id"), str) and PROGRAM_ID.match(meta["program_id"]):
                out.append((f.name, f.path, meta))
        return out

    def find(self, store, program_id: str) -> tuple[str, Path, dict[str, Any]]:
        """The program with this id, or a 404 refusal whose detail says "not found" (the client's cue)."""
        if not PROGRAM_ID.match(program_id):
            raise ApiError(404, f"program {program_id[:80]!r} not found: a program id is 16 to 64 lowercase hex digits")
        path = self.jobs.program_path(program_id)
        if path is not None:
            st = path.stat()
            meta = self.meta(path, st.st_mtime_ns, st.st_size)
            if meta is not None and meta.get("program_id") == program_id:
                return program_id, path, meta
        for name, path, meta in self.entries(store):
            if meta["program_id"] == program_id:
                return name, path, meta
        raise ApiError(404, f"program {program_id} not found on this server")

    def by_name(self, store, name: str) -> str | None:
        """The program id of a served program by its model name (so `function("alert")` works)."""
        for served, _, meta in self.entries(store):
            if served == name:
                return meta["program_id"]
        return None


class PawApi:
    """The routes' state: settings, the compile queue, the program directory, slugs, runtimes. The
    served programs are the app's `ProgramStore` (`request.app.state.store`)."""

    def __init__(self, settings, jobs: CompileJobs):
        self.settings, self.jobs = settings, jobs
        self.programs = ProgramDirectory(jobs)
        self.slugs = SlugTable(settings.data_dir / "slugs.json")
        self.runtimes = Runtimes(self._interpreters, lambda: models_dirs(settings.models_dir), self._compiler_files)

    def _interpreters(self) -> list[Path | None]:
        """Interpreter files this server has: the one programs run on, and the compilers'."""
        found: list[Path | None] = [self.settings.interpreter, self.settings.compile_models.interpreter]
        found += [c.files.interpreter for c in self.jobs.compilers()[0]]
        return found

    def _compiler_files(self) -> list[Path | None]:
        """The compilers' own GGUFs (Qwen3 models like a Standard interpreter): never a runtime."""
        given = self.settings.compile_models
        found: list[Path | None] = [given.compiler, given.pseudo_compiler]
        for c in self.jobs.compilers()[0]:
            found += [c.files.compiler, c.files.pseudo_compiler]
        return found

    # -- helpers --------------------------------------------------------------------------------

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(422, f"the request body must be a JSON object, not {type(body).__name__}")
        return body

    def _spec(self, body: dict[str, Any]) -> str:
        spec = body.get("spec")
        if not isinstance(spec, str) or not spec.strip():
            raise ApiError(422, "'spec' must be a non-empty string: what the function should do, in words")
        limit = self.settings.max_input_chars
        if len(spec) > limit:
            raise ApiError(413, f"'spec' is {len(spec)} characters; this server takes at most {limit}")
        return spec

    @staticmethod
    def _optional(body: dict[str, Any], name: str, kind: type) -> Any:
        value = body.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            raise ApiError(422, f"{name!r} must be a {kind.__name__}, not {type(value).__name__}")
        return value

    async def _compile_request(self, body: dict[str, Any]):
        spec = self._spec(body)
        requested = self._optional(body, "compiler", str)
        slug = self._optional(body, "slug", str)
        if slug is not None:
            try:
                check_slug(slug)
            except SlugError as exc:
                raise ApiError(422, str(exc)) from None
        for name, kind in (("name", str), ("tags", list), ("public", bool), ("ephemeral", bool)):
            self._optional(body, name, kind)  # accepted, and meaningless on a local server
        # the first request finds the compiler and hashes its files (seconds): off the event loop
        return spec, await run_in_threadpool(self.jobs.pick, requested), slug

    def _job_answer(self, job: Job, slug: str | None) -> dict[str, Any]:
        status = self.jobs.status(job.job_id)
        if slug is not None and status["program_id"] is not None:
            status["version"], status["version_action"] = self.slugs.bind(slug, status["program_id"])
            status["slug"] = slug
        return status

    # -- compile --------------------------------------------------------------------------------

    async def compile(self, request: Request) -> Response:
        """Compile and wait: the official client's `compile()` (it waits up to 40 minutes)."""
        spec, compiler, slug = await self._compile_request(await self._body(request))
        job = self.jobs.submit(spec, compiler)
        await self.jobs.wait(job)
        answer = self._job_answer(job, slug)
        if answer["status"] == "failed":
            raise ApiError(422 if job.input_error else 500, f"compile failed: {answer['error']}")
        if answer["status"] != "done":  # cancelled through DELETE /compile/{job_id} while this request waited
            raise ApiError(409, f"compile job {job.job_id} was {answer['status']}")
        answer["status"] = "compiled"
        return JSONResponse(answer)

    async def compile_async(self, request: Request) -> Response:
        spec, compiler, slug = await self._compile_request(await self._body(request))
        job = self.jobs.submit(spec, compiler)
        return JSONResponse(self._job_answer(job, slug), status_code=200 if job.cached else 202)

    async def precheck(self, request: Request) -> Response:
        body = await self._body(request)
        spec = self._spec(body)
        compiler = await run_in_threadpool(self.jobs.pick, self._optional(body, "compiler", str))
        program_id = self.jobs.lookup(spec, compiler)
        return JSONResponse({"cached": program_id is not None, "program_id": program_id,
                             "compiler_snapshot": compiler.snapshot or compiler.name, "compiler_kind": COMPILER_KIND,
                             "queue_length": self.jobs.queue_length(), "estimated_wait_s": None})

    async def job_status(self, request: Request) -> Response:
        return JSONResponse(self.jobs.status(request.path_params["job_id"]))

    async def job_cancel(self, request: Request) -> Response:
        return JSONResponse(self.jobs.cancel(request.path_params["job_id"]))

    # -- programs -------------------------------------------------------------------------------

    def _describe(self, name: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        program_id = meta["program_id"]
        aliases = self.slugs.slugs_of(program_id) + ([name] if name != program_id else [])
        return {**{k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None},
                "id": program_id, "program_id": program_id, "name": name, "status": "compiled",
                "model": name, "aliases": aliases, "slug": aliases[0] if aliases else None, "downloads": 0,
                "size_bytes": path.stat().st_size}

    async def program(self, request: Request) -> Response:
        found = await run_in_threadpool(self.programs.find, request.app.state.store, request.path_params["program_id"])
        return JSONResponse(self._describe(*found))

    async def download(self, request: Request) -> Response:
        program_id = request.path_params["program_id"]
        _, path, _ = await run_in_threadpool(self.programs.find, request.app.state.store, program_id)
        return FileResponse(path, media_type="application/zip", filename=f"{program_id}.paw")

    async def programs_list(self, request: Request) -> Response:
        page = _int_param(request, "page", 1, 1, 1_000_000)
        per_page = _int_param(request, "per_page", 20, 1, MAX_PAGE_SIZE)
        sort = request.query_params.get("sort", "recent")
        if sort not in ("recent", "name"):
            raise ApiError(422, f"sort {sort[:40]!r} is not one of 'recent', 'name'")
        entries = await run_in_threadpool(self.programs.entries, request.app.state.store)
        if sort == "recent":
            entries.sort(key=lambda e: e[1].stat().st_mtime_ns, reverse=True)
        else:
            entries.sort(key=lambda e: e[0])
        chosen = entries[(page - 1) * per_page: page * per_page]
        return JSONResponse({"programs": [self._describe(*e) for e in chosen], "total": len(entries),
                             "page": page, "per_page": per_page})

    def _resolve(self, request: Request, reference: str) -> str:
        program_id = self.slugs.resolve(reference) or self.programs.by_name(request.app.state.store, reference)
        if program_id is None:
            raise ApiError(404, f"slug {reference[:80]!r} not found: neither a slug given at compile time nor the "
                                f"name of a served program")
        return program_id

    async def resolve(self, request: Request) -> Response:
        return JSONResponse({"program_id": await run_in_threadpool(self._resolve, request, request.path_params["slug"])})

    async def versions(self, request: Request) -> Response:
        slug = request.path_params["slug"]
        listed = self.slugs.versions(slug)
        if listed is None:  # a served program's name: one version
            program_id = await run_in_threadpool(self._resolve, request, slug)
            listed = {"slug": slug, "main_version": 1, "versions": [{"version": 1, "program_id": program_id, "is_main": True}]}
        return JSONResponse(listed)

    # -- hosted inference -----------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        """`function(id, remote=True)` of the official client (its _remote.py): one input through
        the program's batch worker, the same one the OpenAI face feeds, so it batches with them."""
        state = request.app.state
        body = await self._body(request)
        program_id, text = body.get("program_id"), body.get("input")
        if not isinstance(program_id, str):
            raise ApiError(422, "'program_id' must be a string: the id of the program to run")
        if not isinstance(text, str):
            raise ApiError(422, "'input' must be a string: the program's input text")
        if len(text) > self.settings.max_input_chars:
            raise ApiError(400, f"the input is {len(text)} characters long; the server takes at most "
                                f"{self.settings.max_input_chars} (--max-input-chars)", code="input_too_long")
        max_tokens = self._optional(body, "max_tokens", int)
        if max_tokens is None:
            max_tokens = self.settings.max_tokens_cap
        if not 0 <= max_tokens <= self.settings.max_tokens_cap:
            raise ApiError(400, f"max_tokens is {max_tokens}; the server allows 0 to {self.settings.max_tokens_cap} "
                                f"(--max-tokens-cap)", code="max_tokens_too_large")
        temperature = body.get("temperature")  # outputs are greedy, as the program's local call
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
            raise ApiError(422, f"'temperature' must be a number, not {type(temperature).__name__}")
        name, _, _ = await run_in_threadpool(self.programs.find, state.store, program_id)
        worker, call = await run_in_threadpool(_prepare, state, name, text, max_tokens)
        state.admission.acquire(1)
        events: asyncio.Queue = asyncio.Queue()
        job = BatchJob(call, False, asyncio.get_running_loop(), events)
        try:
            try:
                worker.submit(job)
            except PawError as exc:
                raise ApiError(503, str(exc), code="shutting_down") from None
            while True:
                _, kind, value = await events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    break
        finally:
            worker.cancel(job)  # a no-op for a finished job; frees the slot of a request cut short
            state.admission.release(1)
        output = worker.fn.finish(call, value)
        usage = {"prompt_tokens": call.prompt_tokens, "completion_tokens": len(value),
                 "total_tokens": call.prompt_tokens + len(value)}
        return JSONResponse({"output": output, "program_id": program_id, "usage": usage})

    # -- models ---------------------------------------------------------------------------------

    def _compilers(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        found, missing = self.jobs.compilers()
        described = [c.describe(default=i == 0) for i, c in enumerate(found)]
        return described, {FAMILIES[family].compiler: why for family, why in missing.items()}

    async def compilers(self, request: Request) -> Response:
        """The compilers whose files this server has (the default first); `unavailable` says, per
        published compiler this server lacks, which files are missing."""
        compilers, missing = await run_in_threadpool(self._compilers)
        return JSONResponse({"compilers": compilers, **({"unavailable": missing} if missing else {})})

    async def runtime(self, request: Request) -> Response:
        runtime_id = request.path_params["runtime_id"]
        # the first request for a file hashes it (140 MB for the published interpreter): off the event loop
        manifest = await run_in_threadpool(self.runtimes.manifest, runtime_id, str(request.base_url))
        return JSONResponse(manifest)

    async def runtime_gguf(self, request: Request) -> Response:
        runtime_id = request.path_params["runtime_id"]
        path = await run_in_threadpool(self.runtimes.file, runtime_id)
        return FileResponse(path, media_type="application/octet-stream", filename=f"{runtime_id}.gguf")


def _prepare(state, name: str, text: str, max_tokens: int):
    """The program's batch worker (loading it on first use) and the prepared call: in the thread pool."""
    try:
        worker = state.batchers.worker(name)
    except UnknownProgramError as exc:
        raise ApiError(404, f"program not found: {exc}") from None
    except PawError as exc:
        raise ApiError(500, f"the program {name!r} cannot be loaded: {exc}", code="model_load_failed") from None
    try:
        return worker, worker.fn.prepare(text, max_tokens)
    except ContextOverflowError as exc:
        raise ApiError(400, str(exc), code="context_length_exceeded") from None
    except (PawError, TypeError, ValueError) as exc:
        raise ApiError(400, str(exc), code="invalid_input") from None


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"{name} must be an integer, not {raw[:40]!r}") from None
    if not low <= value <= high:
        raise ApiError(422, f"{name} must be between {low} and {high}, not {value}")
    return value


def _guarded(handler):
    """The route, with the lookup errors of the modules below as API errors (`{"detail": ...}`)."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except (UnknownJobError, UnknownRuntimeError) as exc:
            raise ApiError(404, str(exc), code="not_found") from None
        except JobStartedError as exc:
            raise ApiError(409, str(exc), code="job_started") from None
        except (SlugError, UnknownCompilerError) as exc:  # the request's fault
            raise ApiError(422, str(exc), code="invalid_request") from None
        except NoCompilerError as exc:  # the server's: its compiler files are missing
            raise ApiError(503, str(exc), code="no_compiler") from None

    endpoint.__name__ = handler.__name__
    return endpoint


def compile_jobs(settings) -> CompileJobs:
    """The server's compile queue: the settings' compiler files, models and data folder, and
    `paw-lite compile`'s default options but for the threads (settings.compile_threads)."""
    return CompileJobs(settings.data_dir, settings.compile_models, settings.models_dir,
                       CompileOptions(n_threads=settings.compile_threads))


def routes(settings, jobs: CompileJobs | None = None) -> list[BaseRoute]:
    """The PAW API's routes for `build_app(settings, extra_routes=...)`. `jobs`: the compile queue
    (default: `compile_jobs(settings)`);
    the jobs a stopped server left in its data folder are queued again here."""
    if jobs is None:
        jobs = compile_jobs(settings)
    jobs.resume()  # what a stopped server left queued or running, under the same job ids
    api = PawApi(settings, jobs)
    r = "/api/v1"
    table = [
        ("POST", f"{r}/compile", api.compile),
        ("POST", f"{r}/compile/precheck", api.precheck),
        ("POST", f"{r}/compile/async", api.compile_async),
        ("GET", f"{r}/compile/{{job_id}}", api.job_status),
        ("DELETE", f"{r}/compile/{{job_id}}", api.job_cancel),
        ("GET", f"{r}/programs", api.programs_list),
        ("GET", f"{r}/programs/resolve/{{slug:path}}", api.resolve),
        ("GET", f"{r}/programs/{{program_id}}/download", api.download),
        ("GET", f"{r}/programs/{{slug:path}}/versions", api.versions),
        ("GET", f"{r}/programs/{{program_id}}", api.program),
        ("POST", f"{r}/infer", api.infer),
        ("GET", f"{r}/models/compilers", api.compilers),
        ("GET", f"{r}/models/runtimes/{{runtime_id}}", api.runtime),
        ("GET", f"{r}/models/runtimes/{{runtime_id}}/gguf", api.runtime_gguf),
    ]
    return [Route(path, _guarded(handler), methods=[method]) for method, path, handler in table]
