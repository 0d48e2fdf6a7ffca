"""`paw-lite serve`: programs behind an OpenAI-compatible HTTP API (and the PAW REST API).

- `settings.ServeSettings`: what the server serves and its limits;
- `store.ProgramStore`: the programs (the models of the API), loaded on first use;
- `app.build_app`: the Starlette app (auth, body limit and error shapes on every route);
- `run.serving`: run it in a thread on a loopback port (tests, benchmarks); the CLI runs the same.

Needs the `serve` extra (starlette, uvicorn): `pip install 'paw-lite[serve]'`."""

from __future__ import annotations

from .settings import ServeSettings

__all__ = ["ServeSettings"]
