"""Concurrency and crashes: functions used from many threads, processes racing to build the same
prefix cache, and processes killed (SIGKILL) while writing a prefix cache, a bundle or a converted
model. Whatever is left on disk is either complete and valid, or something no later run trusts.

(One function called from 8 threads at once is tests/test_runtime.py::test_threads_get_the_same_results_as_sequential_calls.)"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import paw_lite
from paw_lite import prefix_cache
from paw_lite.atomic import atomic_dir, atomic_path, remove_stale_temporaries
from paw_lite.base_model import BaseModel
from paw_lite.errors import InvalidFileError
from paw_lite.program import Program

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

INPUTS = ["disk usage at 99% on /var", "user logged in", "kernel panic", ""]


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0, what: str = "") -> None:
    """Poll until predicate() holds; fail (with the child's stderr) if the child exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"child exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


# -- threads ---------------------------------------------------------------------------------------------

def test_threads_with_their_own_functions_share_one_cache(tiny_program, tiny_gguf, tmp_path):
    """8 threads each load a function on one shared base model and cache dir at the same moment:
    same results as sequential calls, one valid cache file, no temporary files left."""
    base = BaseModel.load(tiny_gguf)
    with paw_lite.function(tiny_program, base_model=base, cache_dir=tmp_path / "ref", prefix_cache_enabled=False) as ref:
        want = [ref(t, max_tokens=6) for t in INPUTS]
    start = threading.Barrier(8)
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            start.wait()
            with paw_lite.function(tiny_program, base_model=base, cache_dir=tmp_path / "c") as f:
                results[i] = [f(t, max_tokens=6) for t in INPUTS]
        except BaseException as exc:  # reported below, so a failing thread fails the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(results[i] == want for i in range(8))
    files = list((tmp_path / "c" / "prefix").iterdir())
    assert len(files) == 1 and files[0].suffix == ".kv", files


# -- two processes, one cache ----------------------------------------------------------------------------

RACE = r"""
import contextlib, json, os, sys, time
from pathlib import Path
import paw_lite
from paw_lite import prefix_cache
program, model, cache, barrier = sys.argv[1:5]
original = prefix_cache.atomic_path

@contextlib.contextmanager
def meet_before_rename(dest):
    # Both processes have written a complete temporary file; neither has renamed it yet.
    with original(dest) as tmp:
        yield tmp
        Path(barrier, str(os.getpid())).touch()
        while len(os.listdir(barrier)) < 2:
            time.sleep(0.005)

prefix_cache.atomic_path = meet_before_rename
with paw_lite.function(program, base_model=model, cache_dir=cache) as f:
    print(json.dumps([f(t, max_tokens=6) for t in sys.argv[5:]]))
"""


def test_two_processes_building_the_same_prefix_cache_leave_one_valid_cache(tiny_program, tiny_gguf, tmp_path, caplog):
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    procs = [spawn(RACE, tiny_program, tiny_gguf, cache, barrier, *INPUTS) for _ in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout))
    assert len(os.listdir(barrier)) == 2  # both really were inside save() at the same time
    files = list((cache / "prefix").iterdir())
    assert len(files) == 1 and not temporaries(cache / "prefix"), files
    with paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path / "fresh", prefix_cache_enabled=False) as fresh:
        want = [fresh(t, max_tokens=6) for t in INPUTS]
        fresh_k = fresh._prefix_k.copy()
    with caplog.at_level(logging.WARNING, logger="paw_lite"):
        with paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=cache) as cached:
            np.testing.assert_array_equal(cached._prefix_k, fresh_k)  # the surviving file is trusted and right
            assert [cached(t, max_tokens=6) for t in INPUTS] == want
    assert "prefix cache" not in caplog.text
    assert outs == [want, want]


# -- killed while writing a prefix cache -------------------------------------------------------------------

PAUSE_CACHE_WRITE = r"""
import sys, time
from pathlib import Path
import paw_lite
from paw_lite import prefix_cache
program, model, cache, signal_file = sys.argv[1:5]

class HalfThenStop:
    # The cache file: the first write (magic + header) goes through, then the process stops
    # inside the data, waiting to be killed.
    def __init__(self, *a, **k):
        self.f = open(*a, **k)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def __getattr__(self, name):
        return getattr(self.f, name)
    def write(self, data):
        if self.f.tell() > 0:
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            Path(signal_file).touch()
            time.sleep(600)
        return self.f.write(data)

prefix_cache.open = HalfThenStop  # shadows the builtin inside prefix_cache only
paw_lite.function(program, base_model=model, cache_dir=cache)
"""


def test_killed_while_writing_a_prefix_cache(tiny_program, tiny_gguf, tmp_path, caplog):
    cache, flag = tmp_path / "cache", tmp_path / "writing"
    proc = spawn(PAUSE_CACHE_WRITE, tiny_program, tiny_gguf, cache, flag)
    wait_for(flag.exists, proc, what="the cache write began")
    kill(proc)
    folder = cache / "prefix"
    assert [p for p in folder.iterdir() if not p.name.startswith(".")] == []  # no file under a trusted name
    (torn,) = temporaries(folder)
    assert torn.stat().st_size > 0
    with caplog.at_level(logging.WARNING, logger="paw_lite"):
        with paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=cache) as f:
            f("user logged in", max_tokens=3)
    assert "prefix cache" not in caplog.text  # the torn temporary was never read
    assert len([p for p in folder.iterdir() if p.suffix == ".kv"]) == 1
    # The leftover is swept once it is old enough that no live writer can own it.
    os.utime(torn, (time.time() - 7200, time.time() - 7200))
    prefix_cache.save(folder / "other.kv", "k", np.zeros((1, 1, 1, 1)), np.zeros((1, 1, 1, 1)))
    assert not torn.exists()


SAVE_LOOP = r"""
import sys
from pathlib import Path
import numpy as np
from paw_lite import prefix_cache
path, flag = Path(sys.argv[1]), Path(sys.argv[2])
k = np.arange(2 * 4 * 4096 * 64, dtype=np.float32).reshape(2, 4, 4096, 64)  # 8 MiB each for k and v
i = 0
while True:
    prefix_cache.save(path, "key", k + i, -k - i)
    flag.write_text(str(i))
    i += 1
"""


def test_random_kills_during_cache_writes_never_leave_a_trusted_torn_file(tmp_path):
    """SIGKILL at random moments of the writes of a loop that rewrites a 16 MiB cache file: after
    each kill, the file at the cache path is a complete one that loads and checks out."""
    path, flag = tmp_path / "prefix" / "x.kv", tmp_path / "flag"
    shape = (2, 4, 4096, 64)
    base = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    rng = np.random.default_rng(0)
    torn = 0
    for _ in range(4):
        flag.unlink(missing_ok=True)
        proc = spawn(SAVE_LOOP, path, flag)
        wait_for(flag.exists, proc, what="the first save")
        before = len(temporaries(path.parent))
        wait_for(lambda: len(temporaries(path.parent)) > before, proc, what="a save in progress")
        time.sleep(rng.uniform(0, 0.01))
        kill(proc)
        torn += len(temporaries(path.parent)) > before  # the killed writer's temporary stays behind
        loaded = prefix_cache.load(path, "key", shape)
        assert loaded is not None  # a previous complete save is always there
        i = int(loaded[0][0, 0, 0, 1] - base[0, 0, 0, 1])
        np.testing.assert_array_equal(loaded[0], base + i)
        np.testing.assert_array_equal(loaded[1], -base - i)
    assert torn > 0, "no kill landed during a write; the test proved nothing"


# -- killed while writing a bundle ---------------------------------------------------------------------------

SAVE_BUNDLE = r"""
import sys
from pathlib import Path
import numpy as np
from paw_lite.program import Program
dest = Path(sys.argv[1])
adapter = b"GGUF" + np.random.default_rng(0).bytes(24 * 1024 * 1024)  # incompressible: a slow deflate
template = "Task: x\n\n[INPUT]\n{INPUT_PLACEHOLDER}\n[END_INPUT]"
Program(meta={"interpreter": "gpt2"}, template=template, adapter_gguf=adapter).save(dest)
"""


def test_killed_while_writing_a_bundle(tmp_path):
    dest = tmp_path / "out" / "prog.paw"
    proc = spawn(SAVE_BUNDLE, dest)
    wait_for(lambda: dest.parent.exists() and any(p.stat().st_size > 0 for p in temporaries(dest.parent)), proc,
             what="the bundle write began")
    kill(proc)
    assert not dest.exists()
    (torn,) = temporaries(dest.parent)
    with pytest.raises(InvalidFileError, match="no such program"):
        Program.load(dest)
    with pytest.raises(InvalidFileError):  # even read directly, the torn file is refused
        Program.load(torn)


# -- killed while converting a model ---------------------------------------------------------------------------

CONVERT = r"""
import sys
from paw_lite.convert.gpt2 import convert_hf_gpt2
convert_hf_gpt2(sys.argv[1], sys.argv[2], "f32")
"""


def test_killed_while_converting_a_model(tmp_path, tiny_hf, tiny_gguf):
    """SIGKILL while the converted GGUF is being written: no file at the output path, and the
    partial file is refused even when opened directly."""
    final_size = tiny_gguf.stat().st_size
    out = tmp_path / "conv" / "model.gguf"
    for attempt in range(10):
        proc = spawn(CONVERT, tiny_hf, out)
        partial = []

        def writing() -> bool:
            partial[:] = [p for p in temporaries(out.parent) if 0 < p.stat().st_size < final_size] if out.parent.exists() else []
            return bool(partial)

        try:
            wait_for(writing, proc, what="the model write began")
        except pytest.fail.Exception:
            if out.exists():  # the write finished between two polls: try again
                out.unlink()
                continue
            raise
        kill(proc)
        if partial[0].stat().st_size < final_size:
            break
        for p in temporaries(out.parent):
            p.unlink()
    else:
        pytest.fail("never caught the converter in the middle of its write")
    assert not out.exists()
    with pytest.raises(InvalidFileError, match="truncated|past the end|too short"):
        BaseModel.load(partial[0])


# -- the atomic writers themselves ------------------------------------------------------------------------------

def test_atomic_path_keeps_the_old_file_on_error_and_uses_normal_permissions(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert dest.read_bytes() == b"old" and not temporaries(tmp_path)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"new")
    umask = os.umask(0)
    os.umask(umask)
    assert dest.read_bytes() == b"new" and (dest.stat().st_mode & 0o777) == 0o666 & ~umask


def test_atomic_dir_replaces_a_folder_without_a_half_deleted_moment(tmp_path):
    dest = tmp_path / "peft"
    dest.mkdir()
    (dest / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash")
    assert (dest / "a").read_text() == "old" and not temporaries(tmp_path)
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("new")
        os.chmod(tmp / "a", 0o600)  # as a writer going through mkstemp leaves it
    assert (dest / "a").read_text() == "new" and sorted(os.listdir(dest)) == ["a"] and not temporaries(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert (dest / "a").stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, as atomic_path gives


def test_only_old_temporaries_are_swept(tmp_path):
    old, young, other = tmp_path / ".x.kv.abc.tmp", tmp_path / ".y.kv.def.tmp", tmp_path / "keep.kv"
    for p in (old, young, other):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_temporaries(tmp_path) == 1
    assert not old.exists() and young.exists() and other.exists()
