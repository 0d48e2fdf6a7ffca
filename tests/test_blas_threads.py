"""fn.map lowers the BLAS thread count while its workers run: it must find NumPy's OpenBLAS
(through threadpoolctl) and always give the count back, also when several maps overlap and
when the map runs in another thread than the one that set the count."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from paw_lite import blas_threads


def _numpy_uses_openblas() -> bool:
    blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return "openblas" in str(blas.get("name", "")).lower()


@pytest.fixture
def ctl():
    if not _numpy_uses_openblas():
        pytest.skip("this NumPy is not built with OpenBLAS")
    found = blas_threads.controller()
    assert found is not None, "NumPy says it uses OpenBLAS but paw_lite cannot find it"
    before = found.get()
    yield found
    found.set(before)


def test_single_threaded_sets_and_restores(ctl):
    ctl.set(2)
    with blas_threads.single_threaded():
        assert ctl.get() == 1
        with blas_threads.single_threaded():  # nested: still 1, restored only by the outer exit
            assert ctl.get() == 1
        assert ctl.get() == 1
    assert ctl.get() == 2


def test_overlapping_blocks_in_threads_restore_once_all_exit(ctl):
    ctl.set(2)
    inside, release = threading.Barrier(3), threading.Event()

    def hold():
        with blas_threads.single_threaded():
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert ctl.get() == 1
    release.set()
    for t in threads:
        t.join()
    assert ctl.get() == 2


def test_a_thread_lowers_the_count_another_thread_set(ctl):
    """threadpoolctl lets only the thread that last set OpenBLAS's count change it; a map run from
    any thread must still hold BLAS at one thread, and restore the count."""
    ctl.set(2)  # this (the main) thread set it last
    seen = []

    def map_in_a_thread():
        with blas_threads.single_threaded():
            seen.append(ctl.get())
        seen.append(ctl.get())

    t = threading.Thread(target=map_in_a_thread)
    t.start()
    t.join()
    assert seen == [1, 2]
    ctl.set(3)  # and this thread can still change it afterwards
    assert ctl.get() == 3


def test_restored_after_an_error(ctl):
    ctl.set(2)
    with pytest.raises(RuntimeError):
        with blas_threads.single_threaded():
            raise RuntimeError("boom")
    assert ctl.get() == 2


def test_map_workers_follow_blas_and_cores(ctl, monkeypatch):
    ctl.set(2)
    monkeypatch.setattr(blas_threads, "usable_cpus", lambda: 8)
    assert blas_threads.map_workers() == 2
    monkeypatch.setattr(blas_threads, "usable_cpus", lambda: 1)
    assert blas_threads.map_workers() == 1


def test_no_controller_means_one_worker(monkeypatch):
    monkeypatch.setattr(blas_threads, "controller", lambda: None)
    assert blas_threads.map_workers() == 1
    with blas_threads.single_threaded():  # a no-op, not an error
        pass
