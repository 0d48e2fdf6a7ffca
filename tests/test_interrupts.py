"""Ctrl-C during a C call that calls back into Python (as llama.cpp does with its log and
evaluation callbacks): ctypes swallows an exception raised in a callback, so without
`interrupts.deferred` the interrupt is lost and the work runs on."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

import pytest

from paw_lite import interrupts

pytestmark = [pytest.mark.skipif(sys.platform == "win32" or not ctypes.util.find_library("c"),
                                 reason="needs POSIX signals and libc's qsort"),
              pytest.mark.usefixtures("python_ctrl_c")]


_COMPARE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))


def _sort_with_a_ctrl_c_inside() -> list[int]:
    """libc's qsort over a Python comparator that sends this process SIGINT on its first call:
    the handler then runs inside the callback, as it would inside llama.cpp's."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    sent = []

    def compare(a, b) -> int:
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return a[0] - b[0]

    values = (ctypes.c_int * 8)(5, 3, 8, 1, 9, 2, 7, 4)
    libc.qsort(values, len(values), ctypes.sizeof(ctypes.c_int), _COMPARE(compare))
    return list(values)


def test_without_the_guard_ctypes_loses_the_interrupt(monkeypatch):
    """The failure the guard exists for, shown on the real mechanism."""
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", lambda report: ignored.append(report.exc_type))
    assert _sort_with_a_ctrl_c_inside() == [1, 2, 3, 4, 5, 7, 8, 9]  # ran to the end, no exception
    assert ignored == [KeyboardInterrupt]  # ctypes reported it as "ignored" and went on


def test_the_guard_raises_the_interrupt_once_the_call_returns():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            finished.append(_sort_with_a_ctrl_c_inside())
    assert finished == [[1, 2, 3, 4, 5, 7, 8, 9]]  # the call completed; the interrupt came after it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_the_guard_changes_nothing_without_an_interrupt():
    with interrupts.deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(ValueError):  # an error inside the block is raised as it is
        with interrupts.deferred():
            raise ValueError("x")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
