"""The errors a route answers with, in the shape each face's clients read: OpenAI's
`{"error": {"message", "type", "param", "code"}}` under /v1 (what the `openai` client parses into
its exceptions), `{"detail": message}` elsewhere (what the official `programasweights` client and
FastAPI-style clients read)."""

from __future__ import annotations

from starlette.responses import JSONResponse

OPENAI_PREFIX = "/v1"

# The OpenAI error types by status (their API reference's error codes); anything else is a server error.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    """A request refused or failed: raise it from any route (or a middleware's receive) and the
    app answers `status` with the message in the path's error shape. code: a short machine-readable
    reason (`model_not_found`, `body_too_large`); param: the request field at fault."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers


def error_body(path: str, error: ApiError) -> dict:
    """The JSON body of an error on this path."""
    if path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/"):
        return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return {"detail": error.message}


def error_response(path: str, error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(path, error), status_code=error.status, headers=error.headers)
