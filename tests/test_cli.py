"""`paw-lite run` and `paw-lite inspect`: text for people, --json for machines, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

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
