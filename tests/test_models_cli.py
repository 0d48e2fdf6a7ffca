"""`paw-lite models import|pull|list|verify` and `paw-lite doctor` on tiny stand-ins of the published
files (no network here: `pull` runs against a stand-in hub serving local folders)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from oracles import oracle
from paw_lite.base_model import file_sha256

from compiler_fixtures import random_mapper_state, write_compiler_meta
from paw_lite.models_dir import importing as md_import, manifest as md_manifest, pull as md_pull, verify as md_verify
from paw_lite.cli import main
from paw_lite.errors import IncompatibleModelError, InvalidFileError, PawError
from paw_lite.gpt2_layout import GPT2Config
from paw_lite.testing.qwen3 import make_tiny_qwen3

torch = oracle("torch")
oracle("llama_cpp")

RANK, BASES = 8, 4
TINY_GPT2 = GPT2Config(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_ff=256, eps=1e-5)  # = tiny_gguf


@pytest.fixture(scope="module")
def downloads(tmp_path_factory, vocab_dir, tiny_gguf) -> dict[str, Path]:
    """Folders laid out like the three published repos."""
    root = tmp_path_factory.mktemp("downloads")
    gpt2 = root / "GPT2-GGUF-Q8_0"
    gpt2.mkdir()
    shutil.copy(tiny_gguf, gpt2 / "gpt2-q8_0.gguf")
    paw = root / "paw-4b-gpt2"
    make_tiny_qwen3(paw / "compiler", vocab_dir, n_layer=2)
    write_compiler_meta(paw / "meta.json", rank=RANK, n_bases=BASES)
    state = random_mapper_state(256, TINY_GPT2, RANK, BASES, seed=0)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, paw / "lora_mapper.pt")
    stock = root / "Qwen3-4B-Instruct-2507"
    shutil.copytree(paw / "compiler", stock)
    tj = json.loads((stock / "tokenizer.json").read_text())
    tj["added_tokens"] = [a for a in tj["added_tokens"] if not a["content"].startswith("<prefix_")]
    (stock / "tokenizer.json").write_text(json.dumps(tj))
    return {"programasweights/GPT2-GGUF-Q8_0": gpt2, "programasweights/paw-4b-gpt2": paw, "Qwen/Qwen3-4B-Instruct-2507": stock}


@pytest.fixture
def manifest(tmp_path, monkeypatch, tiny_gguf) -> Path:
    """The real manifest with the interpreter pinned to the tiny stand-in's size and hash."""
    data = json.loads(md_manifest.MANIFEST_PATH.read_text())
    entry = next(e for e in data["files"] if e["role"] == "interpreter")
    entry["bytes"], entry["sha256"] = tiny_gguf.stat().st_size, file_sha256(tiny_gguf)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(md_manifest, "MANIFEST_PATH", path)
    return path


def cli(capsys, *args: str) -> tuple[int, dict]:
    rc = main([*args, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    return rc, json.loads(out[-1]) if out else {}


def by_role(listing: dict, family: str = "compact") -> dict[str, dict]:
    """The rows of one family's files and of the shared pseudo compiler, by role."""
    return {f["role"]: f for f in listing["files"] if f["family"] in (family, "both")}


def test_manifest_names_match_the_compiler():
    from paw_lite.compiler.config import DEFAULT_FILES

    from paw_lite.compiler.config import default_files

    manifest = md_manifest.load_manifest()
    for family in ("compact", "standard"):
        assert {e.role: e.file_name() for e in manifest if e.serves_family(family)} == default_files(family)
    assert {e.role: e.file_name() for e in manifest if e.serves_family("compact")} == DEFAULT_FILES
    compact, standard = (md_manifest.manifest_entry(f, "interpreter") for f in ("compact", "standard"))
    assert compact.bytes == 139_804_832
    assert compact.sha256 == "0aa260efb2cce9def922e0546b88ad731cf1a68554db73fa2d4a0949cfa958c5"
    assert (standard.name, standard.bytes) == ("qwen3-0.6b-q6_k.gguf", 622_733_120)
    assert standard.sha256 == "9a16ed5cacba959e63b62e2b6840c3eca2b51c3c3e51d31367ef8e4aafeae33c"


def test_import_list_verify(tmp_path, capsys, caplog, manifest, downloads):
    md = tmp_path / "models"
    rc, listing = cli(capsys, "models", "list", "--models", str(md))
    assert rc == 0 and {f["status"] for f in listing["files"]} == {"missing"}
    rc, listing = cli(capsys, "models", "verify", "--models", str(md))  # nothing verified is not "ok"
    assert rc == 1 and not listing["ok"] and {f["status"] for f in listing["files"]} == {"missing"}
    (tmp_path / "a-file").write_text("x")
    for action in ("list", "verify"):
        rc, error = cli(capsys, "models", action, "--models", str(tmp_path / "a-file"))
        assert rc == 2 and "the models directory is a file, not a folder" in error["error"]

    src = tmp_path / "by-hand"  # everything copied into one folder, as a user would
    src.mkdir()
    shutil.copy(downloads["programasweights/GPT2-GGUF-Q8_0"] / "gpt2-q8_0.gguf", src)
    for item in downloads["programasweights/paw-4b-gpt2"].iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy)(item, src / item.name)
    with caplog.at_level("WARNING", logger="paw_lite"):
        rc, done = cli(capsys, "models", "import", str(src), "--models", str(md))
    assert rc == 0
    assert sorted(d["name"] for d in done["written"]) == ["gpt2-q8_0.gguf", "paw-4b-gpt2-compiler-q8_0.gguf",
                                                          "paw-4b-gpt2-mapper.safetensors", "paw-4b-gpt2-meta.json"]
    # the test compiler is a tiny Qwen3: imported, with a warning that it is not the published model
    assert "compiler: a 2-layer, 256-wide Qwen3, not the published Qwen3-4B (36 layers, 2560 wide); imported as the compiler" \
        in caplog.text

    rc, listing = cli(capsys, "models", "verify", "--models", str(md))
    files = by_role(listing)
    assert rc == 0 and listing["ok"]
    assert [files[r]["status"] for r in ("interpreter", "compiler", "mapper", "compiler_meta", "pseudo_compiler")] == \
        ["ok", "ok", "ok", "ok", "missing"]
    assert files["interpreter"]["detail"] == "published sha256 matches"
    assert files["compiler"]["info"]["prefix_ids"] == [151669, 151732]
    assert files["mapper"]["info"] == {"hidden": 256, "rank": RANK, "n_bases": BASES, "interpreter_layers": 2, "modules": 4}
    assert "compile" in files["compiler"]["serves"] and "run" in files["interpreter"]["serves"]

    # a flipped byte in a converted file is caught by the hash recorded at conversion
    compiler = md / "paw-4b-gpt2-compiler-q8_0.gguf"
    data = bytearray(compiler.read_bytes())
    data[-100] ^= 0xFF
    compiler.write_bytes(bytes(data))
    rc, listing = cli(capsys, "models", "verify", "--models", str(md))
    assert rc == 1 and not listing["ok"] and "changed since paw-lite wrote it" in by_role(listing)["compiler"]["detail"]


def test_import_refuses_an_unofficial_interpreter(tmp_path, downloads):
    """With the real manifest, the tiny GPT-2 is not the published gpt2-q8_0.gguf."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(downloads["programasweights/GPT2-GGUF-Q8_0"] / "gpt2-q8_0.gguf", src)
    with pytest.raises(IncompatibleModelError, match="not the published gpt2-q8_0.gguf"):
        md_import.import_dir(src, tmp_path / "models")
    assert not (tmp_path / "models" / "gpt2-q8_0.gguf").exists()


class StandInHub:
    """huggingface_hub's two entry points used by pull, serving local folders; the endpoint is a
    listening local socket so the reachability check passes."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.calls: list[tuple[str, list[str]]] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.constants = type("C", (), {"HF_HUB_OFFLINE": False, "ENDPOINT": f"http://127.0.0.1:{self._sock.getsockname()[1]}"})

    def snapshot_download(self, repo: str, allow_patterns: list[str], cache_dir: str) -> str:
        self.calls.append((repo, allow_patterns))
        return str(self.repos[repo])


def test_pull_downloads_and_converts(tmp_path, manifest, downloads):
    hub = StandInHub(downloads)
    md = tmp_path / "models"
    done = md_pull.pull(md, md_import.ImportOptions(quant="q8_0"), hub=hub)
    assert sorted(repo for repo, _ in hub.calls) == sorted(downloads)
    assert dict(hub.calls)["programasweights/paw-4b-gpt2"] == ["compiler/*", "lora_mapper.pt", "meta.json"]
    names = sorted(d["name"] for d in done)
    assert names == ["gpt2-q8_0.gguf", "paw-4b-gpt2-compiler-q8_0.gguf", "paw-4b-gpt2-mapper.safetensors",
                     "paw-4b-gpt2-meta.json", "qwen3-4b-instruct-2507-q8_0.gguf"]
    statuses = {s.role: s for s in md_verify.survey(md, verify=True) if s.family != "standard"}
    assert all(s.status == "ok" for s in statuses.values()), {r: s.detail for r, s in statuses.items()}
    assert "prefix_ids" not in statuses["pseudo_compiler"].info  # the stock model: no <prefix_k>


def _pull_cli(tmp_path, **env) -> tuple[subprocess.CompletedProcess, float]:
    import os

    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "paw_lite", "models", "pull", "--models", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    return r, time.perf_counter() - start


def test_pull_offline_fails_fast_with_the_import_hint(tmp_path):
    r, _ = _pull_cli(tmp_path, HF_HUB_OFFLINE="1")
    assert r.returncode == 2 and "paw-lite models import DIR" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with socket.socket() as s:  # a port nothing listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r, seconds = _pull_cli(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert r.returncode == 2 and "cannot reach" in r.stderr and "paw-lite models import DIR" in r.stderr
    assert seconds < 30
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_doctor(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    rc, report = cli(capsys, "doctor", "--models", str(tmp_path / "models"))
    checks = {c["check"]: c for c in report["checks"]}
    assert rc == 0 and report["ok"], report
    assert checks["llama.cpp runs a Q8_0 model"]["status"] == "ok"
    assert checks["cache directory writable"]["status"] == "ok"
    assert all(checks[f"import {m}"]["detail"] for m in ("numpy", "gguf", "tokenizers", "safetensors"))  # versions
    assert checks["models directory"]["status"] == "warn" and "models import DIR" in checks["models directory"]["fix"]
    assert checks["fn.map workers"]["status"] == "ok" and "openblas" in checks["fn.map workers"]["detail"].lower()

    # a native build that crashes on this CPU (as -march=native does with AMX on Q8_0) is reported, not fatal
    from paw_lite.cli import doctor

    monkeypatch.setattr(doctor, "_CHILD", "import os; os.abort()")
    rc, report = cli(capsys, "doctor", "--models", str(tmp_path / "models"))
    llama = {c["check"]: c for c in report["checks"]}["llama.cpp runs a Q8_0 model"]
    assert rc == 1 and llama["status"] == "fail" and "signal 6" in llama["detail"] and "GGML_NATIVE=OFF" in llama["fix"]
    assert "--force-reinstall" in llama["fix"] and "--no-cache-dir" in llama["fix"]

    monkeypatch.setattr(doctor, "_CHILD", "import json, sys; print(json.dumps([[0.0] * 259] * 12))")
    rc, report = cli(capsys, "doctor", "--models", str(tmp_path / "models"))
    llama = {c["check"]: c for c in report["checks"]}["llama.cpp runs a Q8_0 model"]
    assert rc == 1 and "differ from paw_lite's NumPy interpreter" in llama["detail"]


def test_doctor_reports_a_corrupt_model(tmp_path, capsys, monkeypatch, manifest, downloads):
    md = tmp_path / "models"
    md_import.import_dir(downloads["programasweights/GPT2-GGUF-Q8_0"], md)
    (md / "gpt2-q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    rc, report = cli(capsys, "doctor", "--models", str(md))
    bad = {c["check"]: c for c in report["checks"]}["model gpt2-q8_0.gguf"]
    assert rc == 1 and bad["status"] == "fail" and "expected the published" in bad["detail"] and "pull" in bad["fix"]


def test_doctor_reports_an_unreadable_models_directory_among_its_checks(tmp_path, capsys, monkeypatch):
    md = tmp_path / "models"
    md.mkdir()
    (md / "installed.json").write_text("garbage")
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    rc, report = cli(capsys, "doctor", "--models", str(md))
    checks = {c["check"]: c for c in report["checks"]}
    assert rc == 1 and checks["models directory"]["status"] == "fail" and "installed.json" in checks["models directory"]["detail"]
    assert checks["cache directory writable"]["status"] == "ok"  # the other checks still ran


def _llama_ok(monkeypatch):
    """doctor's llama.cpp child run (seconds) stubbed out where a test is about its other checks."""
    from paw_lite.cli import doctor

    monkeypatch.setattr(doctor, "check_llama", lambda tmp: doctor._check("llama.cpp runs a Q8_0 model", "ok", "stubbed"))


def test_doctor_fails_when_the_models_path_is_a_file(tmp_path, capsys, monkeypatch):
    """It said `warn ... does not exist` and `all checks passed (with warnings)`, exit 0, where
    `models verify` refuses the same path."""
    _llama_ok(monkeypatch)
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    lines = tmp_path / "lines.txt"
    lines.write_text("x")
    rc, report = cli(capsys, "doctor", "--models", str(lines))
    check = {c["check"]: c for c in report["checks"]}["models directory"]
    assert rc == 1 and not report["ok"] and check["status"] == "fail"
    assert check["detail"] == f"{lines}: the models directory is a file, not a folder"
    assert check["fix"] == "point --models or PAW_LITE_MODELS at a folder"
    rc, error = cli(capsys, "models", "verify", "--models", str(lines))  # the same words
    assert rc == 2 and error["error"] == f"{check['detail']}; {check['fix']}"


def test_install_hints_build_llama_cpp_portably_and_force_a_reinstall_only_of_a_broken_build(tmp_path, monkeypatch):
    """doctor's hint for a missing jinja2 built llama.cpp natively (the build that crashes on AMX),
    its hint for a missing llama_cpp said "reinstall --force-reinstall", and require() left out
    --no-cache-dir. One install command now, from paw_lite.errors."""
    from paw_lite.cli import doctor
    from paw_lite.errors import COMPILE_INSTALL, MissingDependencyError, require

    assert COMPILE_INSTALL == """CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir 'paw-lite[compile]'"""
    monkeypatch.setitem(sys.modules, "jinja2", None)  # None in sys.modules: imports fail, find_spec says absent
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    checks = {c["check"]: c for c in doctor.check_imports()}
    for module in ("jinja2", "llama_cpp"):
        assert checks[f"import {module}"]["status"] == "warn" and checks[f"import {module}"]["fix"] == COMPILE_INSTALL
        with pytest.raises(MissingDependencyError) as info:
            require(module, "compile")
        assert str(info.value) == f"{module} is needed for this command and is not installed: {COMPILE_INSTALL}"
    llama = doctor.check_llama(tmp_path)
    assert llama["status"] == "warn" and llama["fix"] == COMPILE_INSTALL
    assert checks["import huggingface_hub"]["status"] == "ok"


@pytest.fixture
def installed(tmp_path, manifest, downloads) -> Path:
    """A models directory holding the interpreter, compiler, mapper and meta.json, without
    installed.json: a recorded sha256 would flag a changed file before its structural check."""
    src = tmp_path / "by-hand"
    src.mkdir()
    shutil.copy(downloads["programasweights/GPT2-GGUF-Q8_0"] / "gpt2-q8_0.gguf", src)
    for item in downloads["programasweights/paw-4b-gpt2"].iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy)(item, src / item.name)
    md = tmp_path / "models"
    md_import.import_dir(src, md)
    (md / "installed.json").unlink()
    return md


def test_each_row_reports_its_own_files_problem(tmp_path, capsys, monkeypatch, installed):
    """A garbage mapper beside a bad meta.json showed the meta.json's error on the mapper's row; with
    meta.json fixed, the truncated compiler's; its own only came last. The mapper's header is now
    checked first, and when its shape cannot be known the row names the file that is the cause."""
    mapper, meta, compiler, interpreter = (installed / name for name in (
        "paw-4b-gpt2-mapper.safetensors", "paw-4b-gpt2-meta.json", "paw-4b-gpt2-compiler-q8_0.gguf", "gpt2-q8_0.gguf"))
    good = {p: p.read_bytes() for p in (mapper, meta, compiler, interpreter)}

    def verify() -> tuple[int, dict[str, str]]:
        rc, listing = cli(capsys, "models", "verify", "--models", str(installed))
        return rc, {role: f["detail"] for role, f in by_role(listing).items() if f["status"] != "missing"}

    def caused_by(other: Path) -> str:
        return f"{mapper}: cannot check its shape: {other.name} is unreadable (see its row); fix that file first"

    rc, rows = verify()
    assert rc == 0 and rows["mapper"] == "structure checked; no recorded sha256"

    meta.write_text("{bad")  # mapper ok, meta.json bad
    rc, rows = verify()
    assert rc == 1 and rows["compiler_meta"].startswith(f"{meta}: cannot read the compiler meta.json")
    assert rows["mapper"] == caused_by(meta)

    mapper.write_bytes(b"\xff" * 64)  # both bad: each row its own problem
    rc, rows = verify()
    assert rows["mapper"].startswith(f"{mapper}: header length 18446744073709551615 exceeds the file")
    assert rows["compiler_meta"].startswith(f"{meta}: cannot read the compiler meta.json")

    meta.write_bytes(good[meta])
    compiler.write_bytes(good[compiler][:1000])  # mapper bad, compiler truncated
    rc, rows = verify()
    assert rc == 1 and rows["mapper"].startswith(f"{mapper}: header length") and rows["compiler"].startswith(f"{compiler}:")
    assert rows["compiler_meta"] == "structure checked; no recorded sha256"

    mapper.write_bytes(good[mapper])  # mapper ok, compiler truncated
    rc, rows = verify()
    assert rows["mapper"] == caused_by(compiler) and "mapper" not in rows["compiler"]

    compiler.write_bytes(good[compiler])
    interpreter.write_bytes(good[interpreter][:1000])  # mapper ok, interpreter truncated
    rc, rows = verify()
    assert rows["mapper"] == caused_by(interpreter) and "expected the published" in rows["interpreter"]

    # doctor's rows are the same
    interpreter.write_bytes(good[interpreter])
    meta.write_text("{bad")
    _llama_ok(monkeypatch)
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    rc, report = cli(capsys, "doctor", "--models", str(installed))
    checks = {c["check"]: c for c in report["checks"]}
    assert rc == 1 and checks[f"model {mapper.name}"]["status"] == "fail"
    assert checks[f"model {mapper.name}"]["detail"] == caused_by(meta)
    assert checks[f"model {meta.name}"]["detail"].startswith(f"{meta}: cannot read the compiler meta.json")


def test_models_readme_lists_every_manifest_file():
    """models/README.md says what the models directory holds; its table listed the interpreter only."""
    readme = (md_manifest.MANIFEST_PATH.parent / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    manifest = md_manifest.load_manifest()
    assert len(rows) == len(manifest)
    for entry in manifest:
        row = next((r for r in rows if r.startswith(f"| `{entry.name}`")), None)
        assert row is not None, f"{entry.name} is not in models/README.md"
        assert entry.source["repo"] in row and row.count(" | ") == 3  # file | what | source | used by
        if entry.default_quant:
            assert f"(default `{entry.default_quant}`)" in row
        if entry.bytes:
            assert f"{entry.bytes:,} bytes" in row and entry.sha256 in row


def test_missing_model_hints_are_commands_that_run(tmp_path, capsys):
    rc, listing = cli(capsys, "models", "list", "--models", str(tmp_path / "models"))
    details = [f["detail"] for f in listing["files"] if f["status"] == "missing"]
    assert details and not any("{" in d for d in details)
    convert = [d for d in details if "paw-lite convert" in d]
    assert len(convert) == 5 and all(" -o " + str(tmp_path / "models") in d for d in convert)  # 2 compilers, 2 mappers, 1 pseudo compiler


def test_doctor_says_when_the_cache_path_is_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "cache").write_text("x")
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "cache"))
    rc, report = cli(capsys, "doctor", "--models", str(tmp_path / "models"))
    check = {c["check"]: c for c in report["checks"]}["cache directory writable"]
    assert rc == 1 and check["status"] == "fail" and check["detail"] == f"{tmp_path / 'cache'} is a file, not a folder"


def test_a_failed_import_leaves_no_empty_models_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, error = cli(capsys, "models", "import", str(tmp_path / "empty"), "--models", str(tmp_path / "new-models"))
    assert rc == 2 and "nothing to import" in error["error"]
    assert not (tmp_path / "new-models").exists()


def test_import_finds_the_downloads_copied_in_as_folders_and_says_what_it_did_not_find(tmp_path, capsys, manifest,
                                                                                       downloads):
    """The published repos copied side by side into one folder: everything is imported, not only the
    Qwen3 folder one level down (the compiler, mapper and meta.json were skipped, with exit 0)."""
    src = tmp_path / "by-hand"
    src.mkdir()
    for repo, folder in downloads.items():
        shutil.copytree(folder, src / folder.name)
    md = tmp_path / "models"
    rc, done = cli(capsys, "models", "import", str(src), "--models", str(md), "--quant", "q8_0")
    assert rc == 0 and done["not_found"] == []
    assert sorted(d["role"] for d in done["written"]) == sorted(md_manifest.ROLES)
    assert all(Path(d["source"]).is_absolute() for d in done["written"])

    rc, done = cli(capsys, "models", "import", str(src / "Qwen3-4B-Instruct-2507"), "--models", str(tmp_path / "m2"))
    assert rc == 0 and done["not_found"] == ["interpreter", "compiler", "mapper", "compiler_meta"]
    assert main(["models", "import", str(src / "Qwen3-4B-Instruct-2507"), "--models", str(tmp_path / "m3"),
                 "--only", "compiler", "pseudo_compiler"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"not found in {src / 'Qwen3-4B-Instruct-2507'} or its subfolders: compiler")

    shutil.copytree(downloads["programasweights/paw-4b-gpt2"] / "compiler", src / "another-compiler")
    rc, error = cli(capsys, "models", "import", str(src), "--models", str(tmp_path / "m3"))
    assert rc == 2 and "two candidates for the compiler" in error["error"]


def test_import_checks_what_is_cheap_before_converting(tmp_path, manifest, downloads, monkeypatch):
    """A bad meta.json, a broken installed.json or an unofficial interpreter was refused only after
    the compiler conversion (minutes and GBs on the real models)."""
    from paw_lite.convert import qwen3

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted before the cheap checks")

    monkeypatch.setattr(qwen3, "convert_qwen3", no_conversion)
    src = tmp_path / "src"
    shutil.copytree(downloads["programasweights/paw-4b-gpt2"], src)
    (src / "meta.json").write_text("{}")
    with pytest.raises(PawError, match="meta.json"):
        md_import.import_dir(src, tmp_path / "m1")

    shutil.copy(downloads["programasweights/paw-4b-gpt2"] / "meta.json", src / "meta.json")
    (tmp_path / "m2").mkdir()
    (tmp_path / "m2" / "installed.json").write_text('{"paw-4b-gpt2-meta.json": 5}')
    with pytest.raises(PawError, match="installed.json: malformed record"):
        md_import.import_dir(src, tmp_path / "m2")

    data = bytearray((downloads["programasweights/GPT2-GGUF-Q8_0"] / "gpt2-q8_0.gguf").read_bytes())
    data[-10] ^= 1  # a weight changed: not the pinned interpreter
    (src / "gpt2-q8_0.gguf").write_bytes(bytes(data))
    with pytest.raises(IncompatibleModelError, match="not the published"):
        md_import.import_dir(src, tmp_path / "m3")

    # a pseudo compiler whose tokenizer lacks the chat tokens: refused before the compiler's conversion
    (src / "gpt2-q8_0.gguf").unlink()
    stock = shutil.copytree(downloads["Qwen/Qwen3-4B-Instruct-2507"], src / "Qwen3-4B-Instruct-2507")
    tj = json.loads((stock / "tokenizer.json").read_text())
    for added in tj["added_tokens"]:
        added["special"] = added["special"] and added["content"] != "<|im_start|>"  # plain text, not CONTROL
    (stock / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InvalidFileError, match=r"tokenizer\.json: chat token <\|im_start\|> is missing or not a CONTROL"):
        md_import.import_dir(src, tmp_path / "m4")
    assert not any((tmp_path / m).exists() for m in ("m1", "m3", "m4"))


def test_verify_compares_the_quantization_a_name_states_with_the_file(tmp_path, capsys, downloads):
    """A Q8_0 file copied in as ...-q6_k.gguf was "ok"; a GGUF without general.file_type was imported
    under the default (Q4_K_M) name whatever it held."""
    from paw_lite.convert.qwen3 import convert_qwen3

    q8 = convert_qwen3(downloads["Qwen/Qwen3-4B-Instruct-2507"], tmp_path / "stock-q8_0.gguf", "q8_0")
    md = tmp_path / "models"
    md.mkdir()
    shutil.copy(q8, md / "qwen3-4b-instruct-2507-q6_k.gguf")
    rc, listing = cli(capsys, "models", "verify", "--models", str(md))
    pseudo = by_role(listing)["pseudo_compiler"]
    assert rc == 1 and pseudo["status"] == "bad"
    assert "named q6_k but holds Q8_0" in pseudo["detail"] and "qwen3-4b-instruct-2507-q8_0.gguf" in pseudo["detail"]

    no_type = _without_file_type(q8, tmp_path / "src" / "stock.gguf")
    assert md_verify.gguf_quant(no_type) == "q8_0"  # from its matrices
    done = md_import.import_dir(no_type.parent, tmp_path / "m2")
    assert [d["name"] for d in done] == ["qwen3-4b-instruct-2507-q8_0.gguf"]


def _without_file_type(src: Path, out: Path) -> Path:
    """A copy of a GGUF with general.file_type dropped (older converters did not write it)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(out, arch=str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8"))
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        kind = f.types[0]
        if kind == GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), kind, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), kind)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_a_malformed_installed_record_is_one_line_and_list_does_not_need_it(tmp_path, capsys):
    md = tmp_path / "models"
    md.mkdir()
    (md / "installed.json").write_text('{"qwen3-4b-instruct-2507-q4_k_m.gguf": 5}')
    (md / "qwen3-4b-instruct-2507-q4_k_m.gguf").write_bytes(b"GGUF")
    rc, listing = cli(capsys, "models", "list", "--models", str(md))
    assert rc == 0 and by_role(listing)["pseudo_compiler"]["status"] == "present"
    rc, error = cli(capsys, "models", "verify", "--models", str(md))
    assert rc == 2 and "installed.json: malformed record of installed models" in error["error"]


def test_import_progress_restarts_for_each_conversion_pass(tmp_path, downloads):
    """The bar was one bare count over everything; now each pass (writing a file, llama.cpp's
    quantize) is named and counts its own tensors."""
    steps, tensors = [], []
    md_import.import_dir(downloads["Qwen/Qwen3-4B-Instruct-2507"], tmp_path / "models",
                          on_tensor=tensors.append, on_step=lambda what, n: steps.append((what, n, len(tensors))))
    name = "qwen3-4b-instruct-2507-q4_k_m.gguf"
    n = steps[0][1]
    assert steps == [(f"{name}: converting", n, 0), (f"{name}: llama.cpp quantize", n, n)] and len(tensors) == 2 * n


def test_another_model_kept_beside_the_downloads_is_skipped(tmp_path, manifest, downloads, caplog):
    """With subfolders searched, `models import ~/models` meets other GGUFs: they are skipped with a
    warning, not a reason to refuse the whole import."""
    import numpy as np
    from gguf import GGUFWriter

    src = tmp_path / "src"
    shutil.copytree(downloads["programasweights/GPT2-GGUF-Q8_0"], src)
    (src / "llama").mkdir()
    w = GGUFWriter(src / "llama" / "other.gguf", "llama")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    done = md_import.import_dir(src, tmp_path / "models")
    assert [d["role"] for d in done] == ["interpreter"]
    assert "other.gguf: architecture 'llama' is neither" in caplog.text and "skipped" in caplog.text


# -- Standard programs' files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standard_downloads(tmp_path_factory, vocab_dir, downloads) -> dict[str, Path]:
    """Folders laid out like programasweights/Qwen3-0.6B-GGUF-Q6_K (a tiny Qwen3 without the prefix
    tokens, under the published file name) and programasweights/paw-4b-qwen3-0.6b (compiler/,
    meta.json naming Qwen/Qwen3-0.6B, a lora_mapper.pt for that interpreter's 7 modules)."""
    from paw_lite.convert.qwen3 import convert_qwen3
    from paw_lite.gguf_file import read_index
    from paw_lite.qwen3_layout import LORA_MODULES, Qwen3Config

    root = tmp_path_factory.mktemp("standard-downloads")
    hf = make_tiny_qwen3(root / "interp-hf", vocab_dir, n_layer=3, seed=9)
    tj = json.loads((hf / "tokenizer.json").read_text())
    tj["added_tokens"] = [a for a in tj["added_tokens"] if not a["content"].startswith("<prefix_")]
    (hf / "tokenizer.json").write_text(json.dumps(tj))
    interp = root / "Qwen3-0.6B-GGUF-Q6_K"
    interp.mkdir()
    gguf = convert_qwen3(hf, interp / "qwen3-0.6b-q6_k.gguf", "q8_0")
    config = Qwen3Config.from_gguf(read_index(gguf), gguf)

    paw = root / "paw-4b-qwen3-0.6b"
    shutil.copytree(downloads["programasweights/paw-4b-gpt2"] / "compiler", paw / "compiler")
    write_compiler_meta(paw / "meta.json", rank=RANK, n_bases=BASES, interpreter_model="Qwen/Qwen3-0.6B")
    rng = np.random.default_rng(0)
    n_coeff = config.n_layer * 7 * BASES * 2
    state = {"trunk.0.weight": rng.standard_normal((256, 256)), "trunk.0.bias": rng.standard_normal(256),
             "coeff_head.weight": rng.standard_normal((n_coeff, 256)), "coeff_head.bias": rng.standard_normal(n_coeff)}
    for module, (_, suffix) in LORA_MODULES.items():
        d_in, d_out = config.module_dims(module)
        state[f"A_bases_{suffix}"] = rng.standard_normal((BASES, RANK, d_in))
        state[f"B_bases_{suffix}"] = rng.standard_normal((BASES, d_out, RANK))
    torch.save({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}, paw / "lora_mapper.pt")
    return {"programasweights/Qwen3-0.6B-GGUF-Q6_K": interp, "programasweights/paw-4b-qwen3-0.6b": paw}


@pytest.fixture
def both_manifest(manifest, standard_downloads) -> Path:
    """The manifest fixture's, with the Standard interpreter pinned to the tiny stand-in too."""
    data = json.loads(manifest.read_text())
    gguf = standard_downloads["programasweights/Qwen3-0.6B-GGUF-Q6_K"] / "qwen3-0.6b-q6_k.gguf"
    entry = next(e for e in data["files"] if e["role"] == "interpreter" and e["family"] == "standard")
    entry["bytes"], entry["sha256"] = gguf.stat().st_size, file_sha256(gguf)
    manifest.write_text(json.dumps(data))
    return manifest


def test_both_families_import_list_and_verify(tmp_path, capsys, both_manifest, downloads, standard_downloads):
    """Every published download copied side by side: each compiler, mapper and meta.json goes to its
    family's names (read from the meta.json beside it), the Qwen3 interpreter is told from the pseudo
    compiler, and verify checks each mapper against its own family's interpreter."""
    src = tmp_path / "by-hand"
    for folder in [*downloads.values(), *standard_downloads.values()]:
        shutil.copytree(folder, src / folder.name)
    md = tmp_path / "models"
    rc, done = cli(capsys, "models", "import", str(src), "--models", str(md), "--quant", "q8_0")
    assert rc == 0 and done["not_found"] == []
    assert sorted((d["family"], d["role"], d["name"]) for d in done["written"]) == [
        ("both", "pseudo_compiler", "qwen3-4b-instruct-2507-q8_0.gguf"),
        ("compact", "compiler", "paw-4b-gpt2-compiler-q8_0.gguf"), ("compact", "compiler_meta", "paw-4b-gpt2-meta.json"),
        ("compact", "interpreter", "gpt2-q8_0.gguf"), ("compact", "mapper", "paw-4b-gpt2-mapper.safetensors"),
        ("standard", "compiler", "paw-4b-qwen3-0.6b-compiler-q8_0.gguf"),
        ("standard", "compiler_meta", "paw-4b-qwen3-0.6b-meta.json"), ("standard", "interpreter", "qwen3-0.6b-q6_k.gguf"),
        ("standard", "mapper", "paw-4b-qwen3-0.6b-mapper.safetensors")]

    rc, listing = cli(capsys, "models", "verify", "--models", str(md))
    assert rc == 0 and listing["ok"] and {f["status"] for f in listing["files"]} == {"ok"}
    standard = by_role(listing, "standard")
    assert standard["interpreter"]["detail"] == "published sha256 matches"
    assert standard["mapper"]["info"] == {"hidden": 256, "rank": RANK, "n_bases": BASES, "interpreter_layers": 3, "modules": 7}
    assert by_role(listing)["mapper"]["info"]["modules"] == 4
    assert standard["compiler_meta"]["info"]["interpreter_model"] == "Qwen/Qwen3-0.6B"

    main(["models", "list", "--models", str(md)])  # the text form: one heading per family
    text = capsys.readouterr().out
    assert text.index("Compact programs") < text.index("paw-4b-gpt2-mapper") < text.index("Standard programs") \
        < text.index("paw-4b-qwen3-0.6b-mapper") < text.index("Both families") < text.index("qwen3-4b-instruct-2507")

    # a meta.json of the other family in a family's place is named
    shutil.copy(md / "paw-4b-gpt2-meta.json", md / "paw-4b-qwen3-0.6b-meta.json")
    (md / "installed.json").unlink()  # its recorded sha256 would flag the change first
    rc, listing = cli(capsys, "models", "verify", "--models", str(md))
    assert rc == 1 and "the meta.json of a compact compiler (paw-4b-gpt2" in by_role(listing, "standard")["compiler_meta"]["detail"]


def test_import_and_pull_of_one_family(tmp_path, capsys, both_manifest, downloads, standard_downloads):
    src = tmp_path / "by-hand"
    for folder in [*downloads.values(), *standard_downloads.values()]:
        shutil.copytree(folder, src / folder.name)
    rc, done = cli(capsys, "models", "import", str(src), "--models", str(tmp_path / "m1"), "--family", "standard",
                   "--only", "interpreter", "compiler_meta")
    assert rc == 0 and sorted(d["name"] for d in done["written"]) == ["paw-4b-qwen3-0.6b-meta.json", "qwen3-0.6b-q6_k.gguf"]

    hub = StandInHub({**downloads, **standard_downloads})
    done = md_pull.pull(tmp_path / "m2", md_import.ImportOptions(quant="q8_0", families=("standard",)), hub=hub)
    assert sorted(repo for repo, _ in hub.calls) == ["Qwen/Qwen3-4B-Instruct-2507", "programasweights/Qwen3-0.6B-GGUF-Q6_K",
                                                     "programasweights/paw-4b-qwen3-0.6b"]
    assert sorted(d["name"] for d in done) == [
        "paw-4b-qwen3-0.6b-compiler-q8_0.gguf", "paw-4b-qwen3-0.6b-mapper.safetensors", "paw-4b-qwen3-0.6b-meta.json",
        "qwen3-0.6b-q6_k.gguf", "qwen3-4b-instruct-2507-q8_0.gguf"]
