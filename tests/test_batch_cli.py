"""`paw-lite run PROGRAM --input-file FILE --output OUT` through the real command in a subprocess:
junk lines are reported and cost nothing else, an interrupted run (SIGKILL) keeps what it wrote,
and a rerun resumes without redoing or duplicating anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import paw_lite
from paw_lite.batch_files import ResultsFile

MAX_TOKENS = 4


@pytest.fixture(scope="module")
def fn(tiny_program, tiny_gguf, tmp_path_factory):
    f = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path_factory.mktemp("cache"))
    yield f
    f.close()


@pytest.fixture
def cli(tiny_program, tiny_gguf, tmp_path):
    env = {**os.environ, "PAW_LITE_CACHE": str(tmp_path / "cache"), "PYTHONIOENCODING": "ascii", "LC_ALL": "C"}

    def command(*args: str | Path) -> list[str]:
        return [sys.executable, "-m", "paw_lite", "run", str(tiny_program), "--base-model", str(tiny_gguf),
                "--max-tokens", str(MAX_TOKENS), *map(str, args)]

    def run(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(command(*args), env=env, capture_output=True, timeout=timeout)

    run.command, run.env = command, env
    return run


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


JUNK_LINES = [
    b"disk usage at 99% on /var",
    b"\xff\xfe\x00 binary \x80\x81 junk",  # not UTF-8
    b"",  # empty
    b"   \t ",  # whitespace only
    b"nul \x00 and escape \x1b[2J and bell \x07",  # valid UTF-8 control characters
    b"<|endoftext|> typed as text",
    "ünïcödé ✓ \U0001F600".encode(),
    b"word " * 400,  # longer than the context
    b"crlf line\r",  # a CRLF ending: the \r is not part of the input
    b"\xc3",  # a cut UTF-8 sequence
    b"last line, no newline",
]


def test_junk_lines_are_reported_and_every_other_result_is_kept(cli, fn, tmp_path):
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inp.write_bytes(b"\n".join(JUNK_LINES))
    proc = cli("--input-file", inp, "--output", out, "--json", "--batch-size", "4")
    assert proc.returncode == 1, proc.stderr  # 1: some lines failed, the rest are done
    summary = json.loads(proc.stdout)
    assert summary == {"inputs": 11, "already_done": 0, "failed_before": 0, "retried": 0, "ok": 8, "failed": 3,
                       "output": str(out)}
    recs = records(out)
    assert [r["index"] for r in recs] == list(range(len(JUNK_LINES)))
    errors = {r["index"]: r["error"] for r in recs if "error" in r}
    assert set(errors) == {1, 7, 9}
    assert errors[1] == "line 2 is not valid UTF-8 (byte 0)" and errors[9] == "line 10 is not valid UTF-8 (byte 0)"
    assert "context holds 128" in errors[7] and "of the map" not in errors[7]  # the line's own error, no batch index
    good = [(i, line.decode().removesuffix("\r")) for i, line in enumerate(JUNK_LINES) if i not in errors]
    assert [(r["input"], r["output"]) for r in recs if "output" in r] == [(t, fn(t, max_tokens=MAX_TOKENS)) for _, t in good]

    # A rerun has nothing to do and still says lines failed (exit 1). Once the input is fixed, a plain
    # rerun refuses the changed lines; --retry-failed runs the failed lines again, appending their new
    # records: for each line the last record counts, and nothing written before is changed.
    again = cli("--input-file", inp, "--output", out, "--json")
    assert again.returncode == 1 and json.loads(again.stdout) == {
        "inputs": 11, "already_done": 11, "failed_before": 3, "retried": 0, "ok": 0, "failed": 0, "output": str(out)}
    before = out.read_bytes()
    fixed = [b"fixed %d" % i if i in errors else line for i, line in enumerate(JUNK_LINES)]
    inp.write_bytes(b"\n".join(fixed))
    refused = cli("--input-file", inp, "--output", out)
    assert refused.returncode == 2 and b"it failed before: --retry-failed runs such lines again" in refused.stderr
    retry = cli("--input-file", inp, "--output", out, "--json", "--retry-failed", "--batch-size", "4")
    assert retry.returncode == 0 and json.loads(retry.stdout) == {
        "inputs": 11, "already_done": 8, "failed_before": 0, "retried": 3, "ok": 3, "failed": 0, "output": str(out)}
    after = out.read_bytes()
    assert after.startswith(before)
    last = {r["index"]: r for r in records(out)}  # the last record of each line
    assert len(records(out)) == len(JUNK_LINES) + 3 and not any("error" in r for r in last.values())
    assert [last[i]["output"] for i in sorted(errors)] == [fn(f"fixed {i}", max_tokens=MAX_TOKENS) for i in sorted(errors)]
    done = cli("--input-file", inp, "--output", out, "--json", "--retry-failed")  # nothing left to retry
    assert done.returncode == 0 and json.loads(done.stdout)["retried"] == 0 and out.read_bytes() == after


def test_results_go_to_stdout_as_utf8_whatever_the_locale(cli, fn, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("ünïcödé ✓\nuser logged in\n", encoding="utf-8")
    proc = cli("--input-file", inp)  # the fixture runs with LC_ALL=C and PYTHONIOENCODING=ascii
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]
    assert [r["input"] for r in recs] == ["ünïcödé ✓", "user logged in"]
    assert [r["output"] for r in recs] == [fn(r["input"], max_tokens=MAX_TOKENS) for r in recs]


def test_with_json_and_no_output_the_summary_is_json_on_stderr(cli, tmp_path):
    """stdout carries the records, so the summary goes to stderr: as text, or with --json as one JSON line."""
    inp = tmp_path / "in.txt"
    inp.write_text("disk full\nuser logged in\n", encoding="utf-8")
    proc = cli("--input-file", inp, "--json")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["index"] for line in proc.stdout.splitlines()] == [0, 1]
    assert json.loads(proc.stderr) == {"inputs": 2, "already_done": 0, "failed_before": 0, "retried": 0, "ok": 2,
                                       "failed": 0, "output": None}
    plain = cli("--input-file", inp)
    assert plain.returncode == 0 and plain.stderr.decode().strip() == "2 done, 0 failed"
    # an error, too, is stderr's JSON line: stdout holds records only
    failed = cli("--input-file", inp, "--json", "--base-model", tmp_path / "missing.gguf")
    assert failed.returncode == 2 and failed.stdout == b""
    assert "missing.gguf" in json.loads(failed.stderr.splitlines()[-1])["error"]
    refused = cli("--input-file", inp, "--json", "--batch-size", "zz")  # argparse's refusal, too
    assert refused.returncode == 2 and refused.stdout == b""
    assert json.loads(refused.stderr.splitlines()[-1])["type"] == "UsageError"


N_LINES = 80


def test_sigkill_half_way_then_resume(cli, fn, tmp_path):
    """Kill the batch half-way with SIGKILL; what it wrote is intact; simulate a torn last line; a
    rerun resumes: the old lines stay byte for byte, every input appears exactly once, and the
    results equal an uninterrupted run."""
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    texts = [f"event {i}: {'disk full' if i % 3 else 'user logged in'} on host{i % 7}" for i in range(N_LINES)]
    inp.write_text("\n".join(texts) + "\n", encoding="utf-8")
    proc = subprocess.Popen(cli.command("--input-file", inp, "--output", out, "--batch-size", "1"), env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_bytes().count(b"\n") >= 5):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    written = out.read_bytes()
    done = written.count(b"\n")
    assert 5 <= done < N_LINES, done  # killed half-way, not after the end
    complete = written[:written.rfind(b"\n") + 1]
    for line in complete.splitlines():
        json.loads(line)  # every finished line is a whole record
    out.write_bytes(complete + b'{"index": 999, "inp')  # a write cut by the kill
    rerun = cli("--input-file", inp, "--output", out, "--json")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["already_done"] == done and summary["ok"] == N_LINES - done and summary["failed"] == 0
    assert b"dropping an unfinished last line" in rerun.stderr
    after = out.read_bytes()
    assert after.startswith(complete)  # nothing before the kill was rewritten
    recs = records(out)
    assert sorted(r["index"] for r in recs) == list(range(N_LINES))  # each input exactly once
    assert [r["output"] for r in sorted(recs, key=lambda r: r["index"])] == fn.map(texts, max_tokens=MAX_TOKENS)
    again = cli("--input-file", inp, "--output", out, "--json")  # a third run has nothing to do
    assert again.returncode == 0 and json.loads(again.stdout)["already_done"] == N_LINES
    assert out.read_bytes() == after


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    """A kill between a record's closing brace and its newline (or another tool that ends files
    without one) leaves a complete record: it counts as done and stays; the next record starts on
    a new line. Only a record cut short is dropped."""
    out = tmp_path / "out.jsonl"
    first = b'{"index": 0, "input": "a", "output": "x", "run": "r"}\n'
    last = b'{"index": 1, "input": "b", "output": "y", "run": "r"}'
    out.write_bytes(first + last)
    results = ResultsFile(out)
    try:
        assert sorted(results.done) == [0, 1] and results.done[1].input == "b"
        results.start()
        results.write({"index": 2, "input": "c", "output": "z", "run": "r"})
    finally:
        results.close()
    assert out.read_bytes().startswith(first + last + b"\n")
    assert [json.loads(line)["index"] for line in out.read_bytes().splitlines()] == [0, 1, 2]


def test_resuming_with_another_input_file_is_refused(cli, tmp_path):
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inp.write_text("alpha\nbeta\n", encoding="utf-8")
    assert cli("--input-file", inp, "--output", out).returncode == 0
    before = out.read_bytes()
    inp.write_text("alpha\ngamma\ndelta\n", encoding="utf-8")
    proc = cli("--input-file", inp, "--output", out)
    assert proc.returncode == 2
    assert b"the result for line 2 is for input 'beta'" in proc.stderr and b"now reads 'gamma'" in proc.stderr
    assert out.read_bytes() == before
    # refused before anything is cut: a torn line stays as it was
    torn = before + b'{"index": 3, "in'
    out.write_bytes(torn)
    assert cli("--input-file", inp, "--output", out).returncode == 2
    assert out.read_bytes() == torn
    # an error record is checked like any other: one from another run (or another file) is refused
    foreign = before + b'{"index": 2, "input": null, "error": "timeout", "host": "db1"}\n'
    out.write_bytes(foreign)
    inp.write_text("alpha\nbeta\ngamma\n", encoding="utf-8")  # lines 1 and 2 match their results again
    proc = cli("--input-file", inp, "--output", out, "--retry-failed")
    assert proc.returncode == 2 and b"the result for line 3 was made by another program" in proc.stderr
    assert out.read_bytes() == foreign


@pytest.mark.parametrize("content, message", [
    (b"not a results file\n", b"line 1 (b'not a results file') is not a paw-lite result"),
    (b'{"index": -1, "output": "x"}\n', b"is not a paw-lite result"),
    # a last line without a newline is cut off only when it starts like a paw-lite record
    (b"my notes\nlast line", b"line 1 (b'my notes') is not a paw-lite result"),
    (b"one line, no newline", b"line 1 (b'one line, no newline') is not a paw-lite result (not a JSON record)"),
    (b'{"index": 0, "input": "alpha", "output": "x"}\n{"a": 1}', b"line 2 (b'{\"a\": 1}') is not a paw-lite result"),
    (b"GGUF\x03\x00\x00\x00" + bytes(range(256)), b"is not a paw-lite result"),
])
def test_an_output_file_that_is_not_ours_is_refused(cli, tmp_path, content, message):
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inp.write_text("alpha\n", encoding="utf-8")
    out.write_bytes(content)
    proc = cli("--input-file", inp, "--output", out)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert out.read_bytes() == content


def test_an_output_with_more_lines_than_the_input_is_refused(cli, tmp_path):
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inp.write_text("alpha\nbeta\n", encoding="utf-8")
    assert cli("--input-file", inp, "--output", out).returncode == 0
    inp.write_text("alpha\n", encoding="utf-8")
    before = out.read_bytes()
    proc = cli("--input-file", inp, "--output", out)
    assert proc.returncode == 2 and b"holds a result for line 2, but" in proc.stderr and b"has 1 inputs" in proc.stderr
    assert out.read_bytes() == before


def test_a_utf8_bom_is_not_part_of_the_first_input(cli, fn, tmp_path):
    for name, body in (("bom.txt", "alpha\nbeta\n"), ("bom-json.txt", '{"text": "alpha"}\n{"text": "beta"}\n')):
        inp, out = tmp_path / name, tmp_path / f"{name}.out.jsonl"
        inp.write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert cli("--input-file", inp, "--output", out).returncode == 0
        assert [(r["input"], r["output"]) for r in records(out)] == [(t, fn(t, max_tokens=MAX_TOKENS)) for t in ("alpha", "beta")]


def test_output_must_not_be_the_input(cli, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("alpha\n", encoding="utf-8")
    proc = cli("--input-file", inp, "--output", inp)
    assert proc.returncode == 2 and b"is the input file" in proc.stderr
    assert inp.read_text(encoding="utf-8") == "alpha\n"


@pytest.mark.skipif(sys.platform == "win32", reason="the output lock uses flock")
def test_a_second_run_on_the_same_output_is_refused(cli, tmp_path):
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inp.write_text("alpha\n", encoding="utf-8")
    holder = ResultsFile(out)  # stands for a first run still writing
    try:
        proc = cli("--input-file", inp, "--output", out)
    finally:
        holder.close()
    assert proc.returncode == 2 and b"another paw-lite run is writing this output file" in proc.stderr, proc.stderr
    assert out.read_bytes() == b""


def test_workers_option(cli, fn, tmp_path):
    texts = [f"line {i}: disk error" if i % 3 else f"user {i} logged in" for i in range(12)]
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(texts))
    want = fn.map(texts, max_tokens=MAX_TOKENS, workers=1)
    for workers in ("1", "2"):
        out = tmp_path / f"out-{workers}.jsonl"
        proc = cli("--input-file", inp, "--output", out, "--json", "--workers", workers)
        assert proc.returncode == 0, proc.stderr
        assert [r["output"] for r in sorted(records(out), key=lambda r: r["index"])] == want
    bad = cli("--input-file", inp, "--json", "--workers", "0")
    assert bad.returncode != 0 and b"--workers must be at least 1, not 0" in bad.stderr
    assert not (tmp_path / "out-0.jsonl").exists()



def test_resuming_with_other_options_is_refused(cli, tmp_path):
    """Records name the run that made them (program, interpreter, --max-tokens): a rerun that would
    make different outputs must not fill the rest of the file."""
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inp.write_text("alpha\nbeta\n", encoding="utf-8")
    assert cli("--input-file", inp, "--output", out).returncode == 0
    first = records(out)
    assert len({r["run"] for r in first}) == 1
    out.write_bytes(out.read_bytes().split(b"\n", 1)[0] + b"\n")  # as if interrupted after line 1
    before = out.read_bytes()
    proc = cli("--input-file", inp, "--output", out, "--max-tokens", str(MAX_TOKENS + 1))
    assert proc.returncode == 2, proc.stderr
    assert b"was made by another program, interpreter or --max-tokens" in proc.stderr
    assert out.read_bytes() == before
    legacy = {k: v for k, v in first[0].items() if k != "run"}  # a record from before `run` existed
    out.write_text(json.dumps(legacy) + "\n", encoding="utf-8")
    proc = cli("--input-file", inp, "--output", out)
    assert proc.returncode == 2 and b"(or by an older paw-lite)" in proc.stderr
    out.write_bytes(before)
    proc = cli("--input-file", inp, "--output", out, "--json")  # the same run resumes
    assert proc.returncode == 0 and json.loads(proc.stdout)["already_done"] == 1


def test_json_looking_text_lines_say_how_to_read_them_as_text(cli, tmp_path):
    inp = tmp_path / "logs.txt"
    inp.write_text('{"level": "error", "msg": "disk full"}\nkernel panic\n', encoding="utf-8")
    proc = cli("--input-file", inp)
    assert proc.returncode == 1
    assert b"reading" in proc.stderr and b"as JSONL" in proc.stderr and b"--input-format lines" in proc.stderr
    recs = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]
    assert "no 'text' field" in recs[0]["error"] and "--input-format lines reads each line as text" in recs[0]["error"]
    proc = cli("--input-file", inp, "--input-format", "lines")
    assert proc.returncode == 0, proc.stderr


def test_an_input_the_check_refuses_does_not_send_its_chunk_one_at_a_time():
    """An over-long line made its whole chunk rerun one input at a time (4.6x slower)."""
    from paw_lite.batch_files import BatchItem, run_batch
    from paw_lite.errors import ContextOverflowError

    def check(text: str) -> None:
        if len(text) > 5:
            raise ContextOverflowError("too long")

    calls, recs = [], []

    def call(texts: list[str], on_output) -> list[str]:
        calls.append(texts)
        return [t.upper() for t in texts]

    items = [BatchItem(i, t, None) for i, t in enumerate(["a", "b", "too long", "c", "d"])]
    assert run_batch(items, call, recs.append, chunk=4, check=check) == (4, 1)
    assert calls == [["a", "b", "c"], ["d"]]
    assert recs == [{"index": 0, "input": "a", "output": "A"}, {"index": 1, "input": "b", "output": "B"},
                    {"index": 2, "input": "too long", "error": "too long"}, {"index": 3, "input": "c", "output": "C"},
                    {"index": 4, "input": "d", "output": "D"}]


def test_records_are_written_in_order_as_soon_as_they_are_done():
    """A chunk's records used to be written only when its whole map returned: an interrupt lost
    every finished input of the chunk. Now each record goes out once it and those before it are
    done, so an interrupted chunk keeps its finished prefix."""
    from paw_lite.batch_files import BatchItem, run_batch

    recs = []

    def call(texts: list[str], on_output) -> list[str]:
        on_output(1, "B")  # finishes before input 0: held back, the file stays in input order
        assert recs == []
        on_output(0, "A")
        assert [r["index"] for r in recs] == [0, 1]
        on_output(3, "D")
        raise KeyboardInterrupt  # input 2 never finishes

    items = [BatchItem(i, t, None) for i, t in enumerate("abcd")]
    with pytest.raises(KeyboardInterrupt):
        run_batch(items, call, recs.append, chunk=4)
    assert recs == [{"index": 0, "input": "a", "output": "A"}, {"index": 1, "input": "b", "output": "B"}]


def test_blank_lines_after_the_last_jsonl_record_are_not_inputs(tmp_path):
    """An editor's extra newlines at the end of a JSONL file were error records (exit 1); a blank
    line between records still is one. In lines mode every line stays an input, blank ones too."""
    from paw_lite.batch_files import read_inputs

    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"text": "alpha"}\n\n{"text": "beta"}\n\n  \r\n')
    items = read_inputs(inp)
    assert [(it.index, it.text) for it in items] == [(0, "alpha"), (1, None), (2, "beta")]
    assert "line 2 is not a JSON object" in items[1].error
    assert [it.text for it in read_inputs(inp, "lines")][3:] == ["", "  "]


def test_an_output_with_records_for_trailing_blank_jsonl_lines_still_resumes(cli, tmp_path):
    """Older paw-lite wrote error records for the blank lines after the last JSONL record; those lines
    are no inputs now, and their records must not make the output look like another input file's."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"text": "alpha"}\n{"text": "beta"}\n\n', encoding="utf-8")
    assert cli("--input-file", inp, "--output", out).returncode == 0
    run = records(out)[0]["run"]
    stale = {"index": 2, "input": None, "error": "line 3 is not a JSON object with a string 'text' field", "run": run}
    out.write_bytes(out.read_bytes() + (json.dumps(stale) + "\n").encode())
    proc = cli("--input-file", inp, "--output", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["inputs"] == 2 and summary["already_done"] == 2 and summary["failed_before"] == 0
