"""`paw-lite run` and `paw-lite inspect`: text for people, --json for machines, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import paw_lite
from paw_lite.cli import main


def test_run_one_input_text_and_json(tiny_program, tiny_gguf, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    want = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path / "c")("user logged in", max_tokens=6)
    assert main(["run", str(tiny_program), "user logged in", "--base-model", str(tiny_gguf), "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["run", str(tiny_program), "user logged in", "--base-model", str(tiny_gguf), "--max-tokens", "6", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["output"] == want and record["input"] == "user logged in"


def test_run_text_may_follow_options(tiny_program, tiny_gguf, capsys, monkeypatch, tmp_path):
    """argparse fills PROGRAM and the optional TEXT together: a TEXT after options used to be refused."""
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    fn = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path / "c")
    for argv, text in (([str(tiny_program), "--max-tokens", "3", "--base-model", str(tiny_gguf), "--json", "disk full"], "disk full"),
                       ([str(tiny_program), "--json", "--max-tokens", "3", "--base-model", str(tiny_gguf), "--", "-5 degrees"], "-5 degrees"),
                       ([str(tiny_program), "user in", "--max-tokens", "3", "--base-model", str(tiny_gguf), "--json", "-v"], "user in")):
        assert main(["run", *argv]) == 0
        assert json.loads(capsys.readouterr().out)["output"] == fn(text, max_tokens=3)
    assert main(["run", str(tiny_program), "--max-tokens", "3", "--base-model", str(tiny_gguf), "--json", "-5"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == fn("-5", max_tokens=3)  # a number, as argparse reads it
    assert main(["run", str(tmp_path / "missing.paw"), "--", "--json"]) == 2  # the TEXT "--json" is not the option
    out, err = capsys.readouterr()
    assert out == "" and "missing.paw: no such program" in err
    assert main(["models", "list", "--models", str(tmp_path / "none"), "-v"]) == 0  # -v after a nested command
    capsys.readouterr()
    assert main(["run", str(tiny_program), "--json", "one", "two"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["type"] == "UsageError" and "paw-lite run: error: unrecognized arguments: one two" in err
    assert err.startswith("usage: paw-lite run")  # the command's usage, not the top-level one


def test_inspect(tiny_program, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    assert main(["inspect", str(tiny_program), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapter"]["rank"] == 32 and info["adapter"]["alpha"] == 16.0
    assert info["adapter"]["n_tensors"] == 16 and info["adapter"]["tensor_types"] == {"F32": 16}
    assert info["spec"] == "classify a log line as ALERT or QUIET" and info["interpreter"] == "gpt2"
    assert info["sizes"]["adapter_bytes"] > 1024
    assert main(["inspect", str(tiny_program)]) == 0
    text = capsys.readouterr().out
    assert "rank 32, alpha 16" in text and "pseudo-program:" in text


def test_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.paw"
    bad.write_bytes(b"not a zip")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("paw-lite: error: ") and "bad.paw" in err
    assert main(["run", str(bad), "x", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["type"] == "InvalidFileError"


def test_missing_model_message(tiny_program, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PAW_LITE_MODELS", str(tmp_path / "none"))
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    assert main(["run", str(tiny_program), "x"]) == 2
    assert "paw-lite models pull" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "paw_lite", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("run", "inspect"):
        assert command in out


def test_inspect_does_not_print_terminal_escapes(tiny_program, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    prog = paw_lite.Program.load(tiny_program)
    hostile = paw_lite.Program(meta={**prog.meta, "spec": "evil\x1b[2J\x1b]0;owned\x07"}, template=prog.template,
                               adapter_gguf=prog.adapter_gguf, pseudo_program="line\x1b[31m red")
    path = hostile.save(tmp_path / "hostile.paw")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "evil" in out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"] == "evil\x1b[2J\x1b]0;owned\x07"  # JSON escapes it

    # every field printed, not only the texts: Program.save refuses such a program_id, a stranger's zip need not
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    meta = json.loads(members["meta.json"])
    meta.update(program_id="\x1b]0;PWNED\x07", runtime_id="gpt2-q8_0\x1b[31m")
    members["meta.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(tmp_path / "worse.paw", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "hostile.paw"))  # a file: inspecting needs no writable cache
    assert main(["inspect", str(tmp_path / "worse.paw")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "PWNED" in out


def test_run_shows_control_characters_of_an_output_only_to_pipes(tiny_program, tiny_gguf, tmp_path, capsys, monkeypatch):
    """GPT-2's byte-level vocabulary can write ESC: on a terminal it is shown as U+FFFD."""
    from paw_lite import runtime

    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime.PawFunction, "__call__", lambda self, text, **kw: "out\x1b[2J\x07 put")
    for tty, want in ((False, "out\x1b[2J\x07 put"), (True, "out\ufffd[2J\ufffd put")):
        monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
        assert main(["run", str(tiny_program), "x", "--base-model", str(tiny_gguf)]) == 0
        assert capsys.readouterr().out == want + "\n"


def test_usage_errors_are_json_with_json(tiny_program, capsys):
    assert main(["run", str(tiny_program), "x", "--max-tokens", "abc", "--json"]) == 2
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert error["type"] == "UsageError" and "--max-tokens" in error["error"] and "invalid int value" in error["error"]
    assert "usage:" in captured.err
    assert main(["run", str(tiny_program), "x", "--max-tokens", "abc"]) == 2
    assert capsys.readouterr().out == ""


def test_batch_options_with_one_text_are_refused(tiny_program, tiny_gguf, tmp_path, capsys):
    assert main(["run", str(tiny_program), "x", "--base-model", str(tiny_gguf), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "--output only apply with --input-file" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_a_closed_pipe_is_not_a_traceback(tiny_program, tmp_path):
    env = {**os.environ, "PAW_LITE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "paw_lite", "inspect", str(tiny_program)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written, as with `| head -c 0`
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert b"Traceback" not in err


def test_output_paths_are_checked_before_the_work(tmp_path, capsys):
    """A folder where the output file goes, or a file where its folder goes, is refused in one line
    before any conversion (the temporary file beside the output is never named)."""
    folder = tmp_path / "out"
    folder.mkdir()
    src = tmp_path / "no-such-checkpoint"
    assert main(["convert", "gpt2", str(src), "-o", str(folder), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"] == f"-o {folder} is a folder; give the path of a file to write"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["convert", "gpt2", str(src), "-o", str(a_file / "x.gguf")]) == 2
    assert f"{a_file} is a file, not a folder" in capsys.readouterr().err
    no_models = str(tmp_path / "no-models")  # compile would fail on these, later: the paths go first
    assert main(["compile", "a spec", "-o", str(folder), "--models", no_models]) == 2
    assert f"-o {folder} is a folder" in capsys.readouterr().err
    assert main(["compile", "a spec", "-o", str(tmp_path / "p.paw"), "--peft", str(a_file), "--models", no_models]) == 2
    assert f"--peft {a_file} is a file; give the path of a folder" in capsys.readouterr().err
    # run --input-file: the input and output files go before the program and interpreter load
    no_program = str(tmp_path / "no-such.paw")
    assert main(["run", no_program, "--input-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: cannot read the input file" in capsys.readouterr().err
    (tmp_path / "in.txt").write_text("alpha\n")
    assert main(["run", no_program, "--input-file", str(tmp_path / "in.txt"), "--output", str(folder)]) == 2
    assert f"--output {folder} is a folder" in capsys.readouterr().err
    assert main(["run", no_program, "--input-file", str(tmp_path / "in.txt"), "--output", str(a_file / "o.jsonl")]) == 2
    assert f"{a_file} is a file, not a folder" in capsys.readouterr().err


def test_check_writable(tmp_path, monkeypatch):
    from paw_lite import atomic
    from paw_lite.errors import PawError

    atomic.check_writable(tmp_path / "new" / "deeper" / "x.gguf", "-o")  # missing folders are created later
    atomic.check_writable(tmp_path / "peft", "--peft", folder=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(PawError, match="--peft .* is a file; give the path of a folder"):
        atomic.check_writable(tmp_path / "f", "--peft", folder=True)
    with pytest.raises(PawError, match="--models .* is a file; give the path of a folder"):
        atomic.check_writable(tmp_path / "f", "--models", into=True)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refused)  # root passes permission bits, so simulate
    with pytest.raises(PawError, match=r"-o .*x.gguf: cannot write in .* \(Permission denied\); pick another location"):
        atomic.check_writable(tmp_path / "x.gguf", "-o")
    assert list(tmp_path.iterdir()) == [tmp_path / "f"]  # the probe leaves nothing behind


def test_counts_below_one_are_refused(tmp_path, capsys):
    out = str(tmp_path / "x")
    for argv, option in ((["compile", "a spec", "-o", out, "--threads", "0"], "--threads"),
                         (["compile", "a spec", "-o", out, "--max-new-tokens", "0"], "--max-new-tokens"),
                         (["convert", "mapper", out, "--meta", out, "-o", out, "--hidden", "0"], "--hidden")):
        assert main(argv) == 2
        assert f"{option} must be at least 1, not 0" in capsys.readouterr().err


def test_text_bytes_the_locale_cannot_decode_get_a_hint(tiny_program, tiny_gguf, tmp_path):
    env = {**os.environ, "PAW_LITE_CACHE": str(tmp_path / "cache"), "LC_ALL": "C.UTF-8"}
    r = subprocess.run([os.fsencode(sys.executable), b"-m", b"paw_lite", b"run", os.fsencode(tiny_program), b"ab\xffc",
                        b"--base-model", os.fsencode(tiny_gguf)], capture_output=True, env=env, timeout=120)
    assert r.returncode == 2 and b"at character 2: the input is not valid UTF-8, or put the input in a UTF-8 file" in r.stderr, r.stderr


def test_json_before_the_command_is_the_same_as_after_it(tiny_program, tmp_path, capsys, monkeypatch):
    """--json, like -v, is taken before a command, between a command and its subcommand, and after it."""
    from paw_lite.cli import _subcommands, build_parser

    def leaves(parser, path=()):
        subs = _subcommands(parser)
        return [l for name, c in subs.items() for l in leaves(c, (*path, name))] if subs else [(path, parser)]

    for path, command in leaves(build_parser()):  # every command has --json
        assert any("--json" in a.option_strings for a in command._actions), " ".join(path)
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    models = ["--models", str(tmp_path / "none")]
    for argv in (["--json", "inspect", str(tiny_program)], ["--json", "models", "list", *models],
                 ["models", "--json", "list", *models], ["-v", "--json", "doctor", *models]):
        main(argv)
        out = capsys.readouterr().out
        assert "error" not in json.loads(out), argv
        without = [a for a in argv if a != "--json"]
        main([*without, "--json"])
        assert json.loads(capsys.readouterr().out).keys() == json.loads(out).keys()
    assert main(["inspect", str(tiny_program)]) == 0  # and without it, text
    assert capsys.readouterr().out.startswith("program ")
    assert main(["--json", "run", str(tmp_path / "missing.paw"), "x"]) == 2  # errors too
    assert "missing.paw: no such program" in json.loads(capsys.readouterr().out)["error"]


def test_base_model_errors_say_what_was_expected(tiny_program, tmp_path, capsys):
    from paw_lite.program import Program

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", str(tiny_program), "x", "--base-model", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err == (f"paw-lite: error: {empty}: no config.json; pass an HF GPT-2 folder (config.json, model.safetensors, "
                   f"tokenizer files) or a GPT-2 .gguf\n")
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(Program.load(tiny_program).adapter_gguf)
    assert main(["run", str(tiny_program), "x", "--base-model", str(adapter)]) == 2
    assert capsys.readouterr().err == (f"paw-lite: error: {adapter}: is a LoRA adapter, not a base model; "
                                       f"pass the interpreter GGUF (gpt2-q8_0.gguf) instead\n")


def test_version(capsys):
    """The installed distribution's version (pyproject.toml), which paw_lite.__version__ repeats."""
    from importlib.metadata import version

    assert paw_lite.__version__ == version("paw-lite")
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"paw-lite {paw_lite.__version__}\n"
