"""paw_lite.dask and `paw-lite run --scheduler` on a real LocalCluster of single-threaded worker
processes (shared by the module: starting one costs seconds): outputs equal a local `fn.map`,
records equal a local batch run's byte for byte, a worker killed mid-partition costs a retry and
no record, and each worker's BLAS runs as many threads as the worker has."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.bag as db
import dask.dataframe as dd
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from threadpoolctl import threadpool_info

import dask_hooks
import paw_lite
import paw_lite.dask
from conftest import make_program
from paw_lite.dask import worker as dask_worker

MAX_TOKENS = 4
TEXTS = [f"event {i}: {'disk full' if i % 3 else 'user logged in'} on host{i % 5}" for i in range(13)]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_gguf) -> Path:
    """The workers' models directory: the tiny interpreter under the name the test program asks for."""
    folder = tmp_path_factory.mktemp("worker_models")
    (folder / "gpt2-q8_0.gguf").symlink_to(tiny_gguf)
    return folder


@pytest.fixture(scope="module")
def worker_env(models_dir, tmp_path_factory) -> dict[str, str]:
    return {"PAW_LITE_MODELS": str(models_dir), "PAW_LITE_CACHE": str(tmp_path_factory.mktemp("worker_cache"))}


@pytest.fixture(scope="module")
def client(worker_env):
    """Two worker processes of one thread each. The client process has no PAW_LITE_MODELS: only
    the workers find the interpreter."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      env=worker_env) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def fn(tiny_program, tiny_gguf, tmp_path_factory):
    f = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path_factory.mktemp("cache"))
    yield f
    f.close()


def test_bag_outputs_equal_local_map(client, fn, tiny_program):
    bag = db.from_sequence(TEXTS, npartitions=4)  # uneven partitions: 4, 4, 4, 1
    outputs = paw_lite.dask.map(tiny_program, bag, max_tokens=MAX_TOKENS)
    assert isinstance(outputs, db.Bag) and outputs.npartitions == bag.npartitions
    assert outputs.compute() == fn.map(TEXTS, max_tokens=MAX_TOKENS)
    # one program in the graph, whatever the partition count: shipped to each worker once
    assert sum(str(k).startswith("paw-lite-program-") for k in dict(outputs.__dask_graph__())) == 1


def test_constraints_pass_through(client, fn, tiny_program):
    choices = ["ALERT", "QUIET"]
    outputs = paw_lite.dask.map(tiny_program, db.from_sequence(TEXTS, npartitions=3), choices=choices)
    expected = fn.map(TEXTS, choices=choices)
    assert set(expected) <= set(choices) and outputs.compute() == expected
    with pytest.raises(paw_lite.PawError, match="at most one constraint per call"):  # on the client, before a graph
        paw_lite.dask.map(tiny_program, db.from_sequence(TEXTS, npartitions=1), choices=choices, regex="A|Q")


def test_dataframe_column(client, fn, tiny_program):
    frame = pd.DataFrame({"text": TEXTS, "host": [i % 5 for i in range(len(TEXTS))]}, index=range(100, 100 + len(TEXTS)))
    ddf = dd.from_pandas(frame, npartitions=3)
    ddf["label"] = paw_lite.dask.map(tiny_program, ddf["text"], max_tokens=MAX_TOKENS)
    got = ddf.compute()
    assert list(got.index) == list(frame.index) and list(got["text"]) == TEXTS
    assert list(got["label"]) == fn.map(TEXTS, max_tokens=MAX_TOKENS)


def test_a_missing_value_names_its_row(client, tiny_program):
    frame = pd.DataFrame({"text": ["disk full", None, "ok"]}, index=[7, 8, 9])
    labels = paw_lite.dask.map(tiny_program, dd.from_pandas(frame, npartitions=1)["text"], max_tokens=MAX_TOKENS)
    with pytest.raises(TypeError, match=r"'text' at index 8 holds .*not text; fill or drop missing values"):
        labels.compute()


def test_a_missing_interpreter_names_the_worker(client, tiny_lora, tmp_path):
    program = make_program(tmp_path / "absent.paw", tiny_lora, 16.0, runtime_id="absent-model")
    outputs = paw_lite.dask.map(program, db.from_sequence(TEXTS[:2], npartitions=1))
    with pytest.raises(paw_lite.ModelNotFoundError) as caught:
        outputs.compute()
    message = str(caught.value)
    assert message.startswith("on Dask worker tcp://127.0.0.1:") and "absent-model.gguf is not in the models directory" in message
    assert "PAW_LITE_MODELS" in message


def test_bad_arguments_are_refused_before_a_graph(tiny_program, tiny_gguf):
    bag = db.from_sequence(TEXTS, npartitions=2)
    with pytest.raises(TypeError, match="dask.bag.from_sequence"):
        paw_lite.dask.map(tiny_program, TEXTS)
    with pytest.raises(TypeError, match=r"one column of text, not a whole DataFrame: pass ddf\['text'\]"):
        paw_lite.dask.map(tiny_program, dd.from_pandas(pd.DataFrame({"text": TEXTS}), npartitions=1))
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 0"):
        paw_lite.dask.map(tiny_program, bag, max_tokens=-1)
    with pytest.raises(TypeError, match="cannot be shipped to workers"):
        paw_lite.dask.map(tiny_program, bag, base_model=paw_lite.BaseModel.load(tiny_gguf))
    with pytest.raises(paw_lite.InvalidFileError, match="no such program"):
        paw_lite.dask.map(tiny_program.parent / "missing.paw", bag)


def _blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def _load_on_every_worker(c: Client, program: Path) -> None:
    shipped, opts = paw_lite.dask.ship(program), paw_lite.dask.MapOptions(max_tokens=MAX_TOKENS)
    for address in c.scheduler_info()["workers"]:
        c.submit(dask_worker.describe, shipped, opts, workers=[address], pure=False).result()


def test_worker_blas_threads_follow_the_worker_thread_count(client, tiny_program, worker_env):
    """Dask's nanny starts workers with OPENBLAS_NUM_THREADS=1; a worker that has loaded a program
    runs BLAS on as many threads as it has task threads: 1 here, 2 on a two-thread worker."""
    _load_on_every_worker(client, tiny_program)
    assert set(map(tuple, client.run(_blas_threads).values())) == {(1,)}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                      env=worker_env) as cluster, Client(cluster) as two:
        before = two.run(_blas_threads)
        _load_on_every_worker(two, tiny_program)
        after = two.run(_blas_threads)
    assert list(before.values()) == [[1]] and list(after.values()) == [[2]]


# -- the command line ---------------------------------------------------------------------------

JUNK = [b"\xff not utf-8", b"word " * 400]  # an unreadable line and one longer than the context


@pytest.fixture
def cli(tiny_program, tiny_gguf, tmp_path):
    env = {**os.environ, "PAW_LITE_CACHE": str(tmp_path / "cache")}

    def command(*args: str | Path) -> list[str]:
        return [sys.executable, "-m", "paw_lite", "run", str(tiny_program), "--max-tokens", str(MAX_TOKENS),
                *map(str, args)]

    def run(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(command(*args), env=env, capture_output=True, timeout=timeout)

    run.command, run.env = command, env
    return run


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_cli_records_equal_a_local_run_and_resume_the_same_way(client, cli, tiny_gguf, tmp_path):
    """A local run's output cut after 5 records, resumed on the cluster, becomes the local run's file
    byte for byte: the same records (error records too), the same order, the same summary."""
    inp, local, remote = tmp_path / "in.txt", tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    inp.write_bytes(b"\n".join([*(t.encode() for t in TEXTS[:6]), *JUNK, *(t.encode() for t in TEXTS[6:])]) + b"\n")
    whole = cli("--input-file", inp, "--output", local, "--base-model", tiny_gguf, "--json")
    assert whole.returncode == 1, whole.stderr  # 1: the junk lines failed
    lines = local.read_bytes().splitlines(keepends=True)
    remote.write_bytes(b"".join(lines[:5]))
    # No --base-model: the workers find the interpreter in their own models directory.
    proc = cli("--input-file", inp, "--output", remote, "--scheduler", client.scheduler.address,
               "--partition-size", "3", "--json")
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout) == {"inputs": 15, "already_done": 5, "failed_before": 0, "retried": 0, "ok": 8,
                                       "failed": 2, "output": str(remote)}
    assert remote.read_bytes() == local.read_bytes()
    again = cli("--input-file", inp, "--output", remote, "--scheduler", client.scheduler.address, "--json")
    assert again.returncode == 1 and json.loads(again.stdout)["already_done"] == 15
    assert remote.read_bytes() == local.read_bytes()


def test_cli_worker_killed_mid_partition_costs_a_retry_not_a_record(client, cli, fn, tmp_path):
    """Both workers hold at the start of their first partition; one is killed (SIGKILL) there. The
    scheduler runs its partition again (on the other worker or the restarted one): every input ends
    with exactly one record, equal to the local output."""
    inp, out, markers = tmp_path / "in.txt", tmp_path / "out.jsonl", tmp_path / "markers"
    markers.mkdir()
    texts = [f"request {i} from host{i % 4}: {'timeout' if i % 2 else 'ok'}" for i in range(12)]
    inp.write_text("\n".join(texts) + "\n", encoding="utf-8")
    client.run(dask_hooks.hold_maps, str(markers))
    try:
        proc = subprocess.Popen(cli.command("--input-file", inp, "--output", out, "--scheduler", client.scheduler.address,
                                            "--partition-size", "3", "--json"),
                                env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Bounded wait for a worker to reach its first partition: seconds normally (the CLI starts,
        # the program loads); generous for a machine loaded by other jobs.
        deadline = time.monotonic() + 240
        while not (started := sorted(markers.glob("started-*"))):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no worker started a partition"
            time.sleep(0.01)
        victim = int(started[0].name.removeprefix("started-"))
        os.kill(victim, signal.SIGKILL)
        (markers / "release").touch()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        (markers / "release").touch()
        client.run(dask_hooks.release_maps)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout) == {"inputs": 12, "already_done": 0, "failed_before": 0, "retried": 0, "ok": 12,
                                  "failed": 0, "output": str(out)}
    recs = _records(out)
    assert [r["index"] for r in recs] == list(range(12))  # each input once, in order
    assert [r["output"] for r in recs] == fn.map(texts, max_tokens=MAX_TOKENS)
    client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed worker (bounded: a loaded machine)
    assert victim not in client.run(os.getpid).values()


def test_cli_local_scheduler(cli, fn, tiny_gguf, tmp_path):
    """--scheduler local:2 starts (and stops) a cluster of its own for the run."""
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inp.write_text("\n".join(TEXTS[:5]) + "\n", encoding="utf-8")
    proc = cli("--input-file", inp, "--output", out, "--base-model", tiny_gguf, "--scheduler", "local:2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] == 5
    assert [r["output"] for r in _records(out)] == fn.map(TEXTS[:5], max_tokens=MAX_TOKENS)


@pytest.mark.parametrize("args, message", [
    (["--partition-size", "4"], "--partition-size only applies with --scheduler"),
    (["--scheduler", "local:2", "--workers", "2"], "--workers only applies to a local run"),
    (["--scheduler", "local:0"], "expected local:N with N the number of worker processes"),
    (["--scheduler", "local:2", "--partition-size", "0"], "--partition-size must be at least 1"),
])
def test_cli_refuses_bad_options(cli, tmp_path, args, message):
    inp = tmp_path / "in.txt"
    inp.write_text("disk full\n", encoding="utf-8")
    proc = cli("--input-file", inp, "--output", tmp_path / "out.jsonl", "--json", *args)
    assert proc.returncode == 2 and message in json.loads(proc.stdout)["error"], proc.stdout
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_scheduler_needs_an_input_file(cli):
    proc = cli("disk full", "--scheduler", "local:2", "--json")
    assert proc.returncode == 2 and "--scheduler only apply with --input-file" in json.loads(proc.stdout)["error"]


def test_cli_constraint_records_equal_a_local_run(client, cli, fn, tiny_gguf, tmp_path):
    """--scheduler takes a constraint: records (a cut input's error record too) equal a local run's
    byte for byte; a regex the workers' interpreter cannot compile exits 2 naming --regex before
    any partition runs."""
    choices = ["ALERT", "QUIET"]
    lengths = [len(ids) for ids in fn.map_ids(TEXTS, max_tokens=40, choices=choices)]
    assert min(lengths) < max(lengths)  # so --max-tokens min(lengths) cuts some inputs and not others
    flags = ["--max-tokens", str(min(lengths)), "--choice", "ALERT", "--choice", "QUIET", "--json"]
    inp, local, remote = tmp_path / "in.txt", tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    inp.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    whole = cli("--input-file", inp, "--output", local, "--base-model", tiny_gguf, *flags)
    assert whole.returncode == 1 and json.loads(whole.stdout)["failed"] > 0, whole.stderr  # 1: the cut inputs
    proc = cli("--input-file", inp, "--output", remote, "--scheduler", client.scheduler.address, "--partition-size", "5",
               *flags)
    assert proc.returncode == 1, proc.stderr
    assert remote.read_bytes() == local.read_bytes()
    bad = cli("--input-file", inp, "--output", tmp_path / "bad.jsonl", "--scheduler", client.scheduler.address,
              "--regex", "(unclosed", "--json")
    assert bad.returncode == 2 and "--regex: regex '(unclosed' cannot be compiled" in json.loads(bad.stdout)["error"]
    assert not (tmp_path / "bad.jsonl").exists()
