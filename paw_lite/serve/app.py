"""The server's Starlette app: routes of both faces, with what holds for every route (a bearer
key when one is set, the body-size limit, errors in each face's shape) applied around them.

Routes parse and validate; evaluation runs in the programs' batch workers (`batching`), never on
the event loop."""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batching import Batchers
from .errors import ApiError, error_response
from .limits import Admission
from .settings import ServeSettings
from .store import ProgramStore

log = logging.getLogger("paw_lite.serve")


def build_app(settings: ServeSettings, *, extra_routes: Sequence[BaseRoute] = (),
              store: ProgramStore | None = None, on_shutdown: Sequence[Callable[[], None]] = ()) -> Starlette:
    """The app serving settings.programs_dir (and data_dir/compiled) over the OpenAI API, plus
    extra_routes (the PAW API) under the same key, limits and error handling. app.state holds
    `settings`, `store` (the programs), `batchers` (their batch workers) and `admission` (the
    concurrency limit) for routes to use. on_shutdown: called (in order, in a worker thread) once
    the server has drained its requests, before the batch workers stop: compile jobs stop there."""
    from . import openai_api

    store = store if store is not None else ProgramStore(settings)
    batchers = Batchers(store, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:  # after uvicorn drained in-flight requests: stop the workers, free the programs
            def stop() -> None:
                for hook in on_shutdown:
                    hook()
                batchers.close()
                store.close()

            await run_in_threadpool(stop)  # joins threads: not on the event loop

    app = Starlette(
        routes=[Route("/health", _health, methods=["GET"]), *openai_api.routes(), *extra_routes],
        middleware=[Middleware(_Guard, settings=settings)],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.batchers = batchers
    app.state.admission = Admission(settings.max_concurrent)
    return app


async def _health(request: Request) -> JSONResponse:
    """Liveness for load balancers and scripts waiting for the server (behind the key like every route)."""
    return JSONResponse({"status": "ok"})


async def _api_error(request: Request, exc: Exception):
    assert isinstance(exc, ApiError)
    return error_response(request.url.path, exc)


async def _http_error(request: Request, exc: Exception):
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return error_response(request.url.path, ApiError(exc.status_code, message, code=code, headers=exc.headers))


async def _server_error(request: Request, exc: Exception):
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(request.url.path, ApiError(500, f"internal error ({type(exc).__name__}); the server log "
                                                          f"has the details", code="internal_error"))


class _Guard:
    """ASGI middleware around every route: the bearer key, then the body-size limit (a declared
    Content-Length over it is refused before reading; a body that grows past it while read fails
    the route's read with 413)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings):
        self.app = app
        self.key = None if settings.api_key is None else settings.api_key.encode("utf-8")
        self.limit = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self.key is not None and not _authorized(headers.get(b"authorization"), headers.get(b"x-api-key"), self.key):
            error = ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>' "
                                  "or 'X-API-Key: <key>' (the key the server was started with, --api-key or "
                                  "PAW_LITE_API_KEY)",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error_response(path, error)(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await error_response(path, _too_large(self.limit))(scope, receive, send)
            return
        await self.app(scope, _bounded(receive, self.limit), send)


def _authorized(header: bytes | None, x_api_key: bytes | None, key: bytes) -> bool:
    """A bearer token (OpenAI clients), or the X-API-Key header the official programasweights
    client sends (its client.py) for the PAW API."""
    # compare_digest: the time taken does not tell how much of a guessed key was right
    if x_api_key is not None and hmac.compare_digest(x_api_key.strip(), key):
        return True
    if header is None:
        return False
    scheme, _, token = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's limit of {limit} bytes "
                         f"(--max-body-bytes)", code="body_too_large")


def _bounded(receive: Receive, limit: int) -> Receive:
    """receive, failing with 413 once the body read so far passes the limit (chunked uploads)."""
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
        return message

    return bounded
