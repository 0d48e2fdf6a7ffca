"""The concurrency limit: at most max_concurrent inputs are being evaluated; more are refused at
once with 429 (a client retries; a queue without bound would only add latency and memory)."""

from __future__ import annotations

from .errors import ApiError


class Admission:
    """Counts inputs in evaluation. Used from the event loop only, so a plain counter is exact."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0

    def acquire(self, n: int = 1) -> None:
        """Take n places (a batch of prompts takes one per prompt), or raise 429."""
        if self.active + n > self.limit:
            raise ApiError(429, f"the server is evaluating {self.active} inputs and takes at most {self.limit} at "
                                f"once (--max-concurrent); retry shortly", code="too_many_requests",
                           headers={"Retry-After": "1"})
        self.active += n

    def release(self, n: int = 1) -> None:
        self.active -= n
