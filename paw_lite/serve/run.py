"""Running the server: in this thread until SIGTERM or Ctrl-C (the CLI), or in a background thread
for tests and benchmarks (`serving`). Both run uvicorn the same way; stopping is uvicorn's graceful
shutdown: no new connections, in-flight requests finish, then the app's shutdown stops the batch
workers."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator

from starlette.applications import Starlette

from ..errors import PawError, require
from .settings import ServeSettings

# Seconds a stop waits for in-flight requests before cancelling them (a stream can run minutes).
DRAIN_SECONDS = 60.0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the address is known before uvicorn starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP, and
    # with Nagle on, every response waits ~40 ms for the client's delayed ACK between its header and body writes.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PawError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
                       f"(0: any free one) or --host") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app: Starlette, drain_seconds: float, on_ready: Callable[[], None] | None = None, verbose: bool = False):
    uvicorn = require("uvicorn", "serve")

    class Server(uvicorn.Server):
        """uvicorn's server, telling when it listens and when its shutdown begins."""

        def __init__(self, config):
            super().__init__(config)
            self.ready = threading.Event()
            self.stopping = threading.Event()

        async def startup(self, sockets=None):
            await super().startup(sockets)
            self.ready.set()
            if on_ready is not None and not self.should_exit:
                on_ready()

        async def shutdown(self, sockets=None):
            self.stopping.set()
            await super().shutdown(sockets)

    # log_config None: uvicorn's records go through the process's logging (the CLI's goes to
    # stderr), not to handlers of its own; its access log would otherwise write to stdout, which
    # carries the --json line.
    config = uvicorn.Config(app, log_config=None, log_level="info" if verbose else "warning", lifespan="on",
                            timeout_graceful_shutdown=drain_seconds, access_log=verbose, server_header=False)
    return Server(config)


class ServerThread:
    """The server in a background thread: `start()` returns its base URL once it listens; `stop()`
    drains in-flight requests and returns once it has exited. `stopping` is set when the
    shutdown begins (tests order a drain with it)."""

    def __init__(self, settings: ServeSettings, app: Starlette | None = None, drain_seconds: float = DRAIN_SECONDS):
        if app is None:
            from .app import build_app

            app = build_app(settings)
        self.app = app
        self.settings = settings
        self._sock = bind(settings.host, settings.port)
        self.url = base_url(self._sock)
        self._server = _server(app, drain_seconds)
        self.stopping = self._server.stopping
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="paw-serve", daemon=True)
        self._failed: BaseException | None = None

    def start(self) -> str:
        self._thread.start()
        # Wait for startup, or for the thread to end without it (a lifespan that failed).
        while not self._server.ready.wait(0.05):
            if not self._thread.is_alive():
                self._sock.close()
                raise PawError(f"the server at {self.url} did not start (the log says why)")
        return self.url

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()
        self._sock.close()


@contextlib.contextmanager
def serving(settings: ServeSettings, app: Starlette | None = None) -> Iterator[str]:
    """Serve in a background thread for the block: yields the base URL ("http://127.0.0.1:PORT";
    settings.port 0 picks a free port), and always stops the server (draining) on the way out."""
    server = ServerThread(settings, app)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def serve_forever(settings: ServeSettings, app: Starlette, on_ready=None, verbose: bool = False) -> None:
    """Serve in this thread until SIGTERM or SIGINT (uvicorn's handlers), then drain and return.
    on_ready(url) once it listens; verbose: uvicorn's info log and access log (one line a request)."""
    sock = bind(settings.host, settings.port)
    url = base_url(sock)
    server = _server(app, DRAIN_SECONDS, None if on_ready is None else (lambda: on_ready(url)), verbose)
    # uvicorn catches SIGTERM, drains, then raises the signal again for the handler it found: with
    # the default one the process would die of it (exit -15) after a clean drain. A handler that
    # does nothing lets the command return 0. SIGINT keeps Python's (KeyboardInterrupt: exit 130).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
