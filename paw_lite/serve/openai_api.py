"""The OpenAI-compatible face: GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(streamed as server-sent events with `stream: true`). Routes parse and check; the programs' batch
workers evaluate (`batching`); loading a program and preparing inputs run in the thread pool."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..constraints import ConstraintError, IncompleteOutputError
from ..errors import ContextOverflowError, MissingDependencyError, PawError
from .batching import Job, ProgramWorker, WorkerClosedError
from .errors import ApiError
from .openai_request import Inference, chat_request, completion_request, constraint_field, parse_json
from .store import UnknownProgramError

OWNER = "paw-lite"


def routes() -> list[Route]:
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]


def _model(f) -> dict:
    return {"id": f.name, "object": "model", "created": f.mtime_ns // 1_000_000_000, "owned_by": OWNER}


async def list_models(request: Request) -> JSONResponse:
    files = await run_in_threadpool(request.app.state.store.files)
    return JSONResponse({"object": "list", "data": [_model(f) for f in files]})


async def get_model(request: Request) -> JSONResponse:
    name = request.path_params["model"]
    try:
        f = await run_in_threadpool(request.app.state.store.file, name)
    except UnknownProgramError as exc:
        raise ApiError(404, str(exc), code="model_not_found", param="model") from None
    return JSONResponse(_model(f))


async def completions(request: Request):
    return await _infer(request, completion_request, _CompletionShape())


async def chat_completions(request: Request):
    return await _infer(request, chat_request, _ChatShape())


# -- one inference request ---------------------------------------------------------------------

async def _infer(request: Request, parse: Callable, shape: "_Shape"):
    state = request.app.state
    data = parse_json(await request.body())
    inference: Inference = parse(data, state.settings)
    state.admission.acquire(len(inference.inputs))
    loop = asyncio.get_running_loop()
    meta = {"id": shape.prefix + uuid.uuid4().hex, "created": int(time.time()), "model": inference.model}
    try:
        for attempt in range(2):
            worker, calls = await run_in_threadpool(_prepare, state, inference, data)
            events: asyncio.Queue = asyncio.Queue()  # a retry's own: the first attempt's events are not its
            jobs = [Job(call, inference.stream, loop, events, index) for index, call in enumerate(calls)]
            try:
                for job in jobs:
                    worker.submit(job)
                break
            except WorkerClosedError as exc:  # its program was unloaded meanwhile: load it again, once
                _cancel(worker, jobs)
                if attempt:
                    raise ApiError(503, str(exc), code="unavailable") from None
    except BaseException:
        state.admission.release(len(inference.inputs))
        raise
    watcher = asyncio.ensure_future(_watch(request, events))
    ended = False

    def end() -> None:
        """Once per request, however it ends: drop what is still in the batch (a client that went
        away frees its slots), give back its places."""
        nonlocal ended
        if not ended:
            ended = True
            watcher.cancel()
            _cancel(worker, jobs)
            state.admission.release(len(jobs))

    if inference.stream:
        stream = _stream(worker, jobs, events, shape, meta, inference.include_usage, end)
        return _EventStream(stream, end)
    try:
        results = await _results(jobs, events)
    finally:
        end()
    if results is None:  # the client went away: nobody to answer
        return JSONResponse({}, status_code=499)
    choices = [shape.choice(job.index, *_output(worker, job, ids)) for job, ids in zip(jobs, results)]
    return JSONResponse({**meta, "object": shape.object, "choices": choices, "usage": _usage(jobs, results)})


async def _watch(request: Request, events: asyncio.Queue) -> None:
    """Post (None, "gone", None) to the request's events when its client disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait((None, "gone", None))


def _prepare(state, inference: Inference, data: dict) -> tuple[ProgramWorker, list]:
    """The program's worker (loading the program on first use) and the prepared calls (in the
    thread pool: tokenizing a long input and compiling a constraint take milliseconds to seconds)."""
    try:
        worker = state.batchers.worker(inference.model)
    except UnknownProgramError as exc:
        raise ApiError(404, str(exc), code="model_not_found", param="model") from None
    except WorkerClosedError as exc:
        raise ApiError(503, str(exc), code="unavailable") from None
    except PawError as exc:  # a program file that cannot be loaded: the server's problem, said plainly
        raise ApiError(500, f"the model {inference.model!r} cannot be loaded: {exc}", code="model_load_failed") from None
    calls = []
    for i, text in enumerate(inference.inputs):
        try:
            calls.append(worker.fn.prepare(text, inference.max_tokens, **inference.constraint))
        except ContextOverflowError as exc:
            raise ApiError(400, _which(inference, i, exc), code="context_length_exceeded") from None
        except (ConstraintError, MissingDependencyError, TypeError) as exc:  # the parser checked the rest's types
            raise ApiError(400, str(exc), param=constraint_field(data), code="invalid_constraint") from None
        except (PawError, ValueError) as exc:  # e.g. a lone surrogate (JSON can carry one)
            raise ApiError(400, _which(inference, i, exc), code="invalid_input") from None
    return worker, calls


def _which(inference: Inference, i: int, exc: Exception) -> str:
    return f"input {i}: {exc}" if len(inference.inputs) > 1 else str(exc)


async def _results(jobs: list[Job], events: asyncio.Queue) -> list[list[int]] | None:
    """Every job's output ids, or None when the client went away first."""
    results: dict[Job, list[int]] = {}
    while len(results) < len(jobs):
        job, kind, value = await events.get()
        if kind == "gone":
            return None
        if kind == "error":
            raise value
        if kind == "done":
            job.done = True
            results[job] = value
    return [results[job] for job in jobs]


def _cancel(worker: ProgramWorker, jobs: list[Job]) -> None:
    for job in jobs:
        if not job.done:
            worker.cancel(job)


def _output(worker: ProgramWorker, job: Job, ids: list[int]) -> tuple[str, str]:
    """(text, finish_reason) of a finished job: the text fn(...) returns; "length" when max_tokens
    or the context end cut it (a cut constrained output is returned as far as it got)."""
    try:
        text = worker.fn.finish(job.call, ids)
    except IncompleteOutputError as exc:
        return exc.partial.lstrip(" \t\r\n"), "length"
    return text, _finish_reason(job, ids)


def _finish_reason(job: Job, ids: list[int]) -> str:
    seq = job.call.sequence
    if seq is None:
        return "length"
    if seq.constraint is not None:
        return "stop" if seq.constraint.complete else "length"
    return "length" if len(ids) >= seq.limit else "stop"


def _usage(jobs: list[Job], results: list[list[int]]) -> dict:
    prompt = sum(job.call.prompt_tokens for job in jobs)
    completion = sum(len(ids) for ids in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- streaming ---------------------------------------------------------------------------------

def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


async def _stream(worker: ProgramWorker, jobs: list[Job], events: asyncio.Queue, shape: "_Shape", meta: dict,
                  include_usage: bool, end: Callable[[], None]) -> AsyncIterator[bytes]:
    """The chunks of a streamed response. Each input's pieces concatenate to its full output. A
    client that goes away ends this generator (Starlette cancels it): its jobs are dropped."""
    sent = {job: "" for job in jobs}
    made: dict[Job, list[int]] = {job: [] for job in jobs}
    results: dict[Job, list[int]] = {}
    head = {**meta, "object": shape.chunk_object}
    try:
        for job in jobs:
            first = shape.first_delta(job.index)
            if first is not None:
                yield _sse({**head, "choices": [first]})
        while len(results) < len(jobs):
            job, kind, value = await events.get()
            if kind == "gone":
                return
            if kind == "error":
                yield _sse({"error": _error_body(value)})
                return
            if kind == "tokens":
                made[job] += value
                text = worker.fn.partial_text(job.call, made[job])
            else:
                job.done = True
                results[job] = value
                text, reason = _output(worker, job, value)
            piece = text[len(sent[job]):] if text.startswith(sent[job]) else ""
            if piece:
                sent[job] = text
                yield _sse({**head, "choices": [shape.delta(job.index, piece, None)]})
            if kind == "done":
                yield _sse({**head, "choices": [shape.delta(job.index, "", reason)]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(jobs, [results[job] for job in jobs])})
        yield _sse("[DONE]")
    finally:
        end()


class _EventStream(StreamingResponse):
    """Server-sent events, ended by `end` even when the stream never started (a client gone
    before the first chunk)."""

    def __init__(self, chunks: AsyncIterator[bytes], end: Callable[[], None]):
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._end = end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._end()


def _error_body(exc: BaseException) -> dict:
    return {"message": f"evaluation failed: {exc}", "type": "server_error", "param": None, "code": "internal_error"}


class _Shape:
    prefix = object = chunk_object = ""

    def choice(self, index: int, text: str, reason: str) -> dict: ...

    def first_delta(self, index: int) -> dict | None: ...

    def delta(self, index: int, text: str, reason: str | None) -> dict: ...


class _CompletionShape(_Shape):
    prefix, object, chunk_object = "cmpl-", "text_completion", "text_completion"

    def choice(self, index, text, reason):
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}

    def first_delta(self, index):
        return None

    def delta(self, index, text, reason):
        return self.choice(index, text, reason)


class _ChatShape(_Shape):
    prefix, object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def choice(self, index, text, reason):
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                "logprobs": None}

    def first_delta(self, index):
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}

    def delta(self, index, text, reason):
        return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": reason, "logprobs": None}
