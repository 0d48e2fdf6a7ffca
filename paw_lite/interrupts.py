"""Ctrl-C while llama.cpp runs.

CPython runs its SIGINT handler in the next Python code the main thread executes. During a
llama.cpp call that is a callback (a log line, an evaluation callback), and ctypes prints an
exception raised there and swallows it: the Ctrl-C is lost and the work runs to its end. So
around such a call the interrupt is only recorded, and raised as KeyboardInterrupt once the call
has returned. The block is handed a function telling whether one was recorded: llama.cpp's abort
and load-progress callbacks ask it, so a long evaluation or load stops within moments instead of
running on for tens of seconds first."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


def never() -> bool:
    """What `deferred` hands a block where it records nothing: no interrupt is ever pending."""
    return False


@contextlib.contextmanager
def deferred() -> Iterator[Callable[[], bool]]:
    """Hold a Ctrl-C that arrives inside the block until the block ends, then raise it. The block
    gets a function returning whether one has arrived (for callbacks that can stop the C call).
    Only the main thread receives signals, and a handler someone else installed is left alone."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield never
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
