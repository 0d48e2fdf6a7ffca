"""Ctrl-C while llama.cpp runs.

CPython runs its SIGINT handler in the next Python code the main thread executes. During a
llama.cpp call that is a callback (a log line, an evaluation callback), and ctypes prints an
exception raised there and swallows it: the Ctrl-C is lost and the work runs to its end. So
around such a call the interrupt is only recorded, and raised as KeyboardInterrupt once the call
has returned."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block until the block ends, then raise it. Only the
    main thread receives signals, and a handler someone else installed is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
