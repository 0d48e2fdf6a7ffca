""".paw bundles from strangers: every way a hostile or broken bundle can be built is refused with an
error naming the bundle and the problem, without extracting, executing or writing anything, and
with bounded memory. (The importer's basic rules are in test_program.py; this file adds the rest.)"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import paw_lite
from paw_lite.errors import InvalidFileError, ModelNotFoundError
from paw_lite.program import MAX_ARCHIVE_BYTES, PLACEHOLDER, Program

from file_craft import patch_zip_entry, peak_while


@pytest.fixture(scope="module")
def members(tiny_program) -> dict[str, bytes]:
    return Program.load(tiny_program).members()


def zip_bytes(entries, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def tree(root: Path) -> dict[str, int]:
    """Every file and folder under root, with sizes: to prove that nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in sorted(root.rglob("*"))}


def load_refused(path: Path, *needles: str) -> str:
    with pytest.raises(InvalidFileError) as exc:
        Program.load(path)
    message = str(exc.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    return message


# -- names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "../meta.json", "../../../../tmp/evil.txt", "a/../meta.json", "./meta.json", "..\\meta.json", "C:\\meta.json",
    "C:/Windows/meta.json", "//server/share/meta.json", "/meta.json", "META.JSON", "meta.json ", "meta.json/",
    "adapter.gguf/../meta.json", "prompt_template.txt/", "\u2024\u2024/meta.json",
])
def test_traversal_and_absolute_names_are_refused_and_nothing_is_written(tmp_path, members, name):
    """The member meta.json is stored under a hostile name: refused as an unexpected member."""
    bundle_dir = tmp_path / "in" / "deep"
    bundle_dir.mkdir(parents=True)
    path = bundle_dir / "bad.paw"
    entries = [(n, d) for n, d in members.items() if n != "meta.json"] + [(name, members["meta.json"])]
    path.write_bytes(zip_bytes(entries))
    before = tree(tmp_path)
    load_refused(path, "unexpected member", repr(name))
    assert tree(tmp_path) == before


def test_a_nul_in_a_name_gains_nothing(tmp_path, members):
    """zipfile cuts names at a NUL, so 'meta.json\\0/../../x' reads as meta.json. Nothing is ever
    extracted, so the trick cannot reach the file system: the bundle loads, and no file appears."""
    entries = [(n, d) for n, d in members.items() if n != "meta.json"] + [("meta.json\0/../../evil", members["meta.json"])]
    path = tmp_path / "nul.paw"
    path.write_bytes(zip_bytes(entries))
    before = tree(tmp_path)
    assert Program.load(path).members() == members
    assert tree(tmp_path) == before


@pytest.mark.parametrize("extra", ["prefix_cache.bin", "prefix_tokens.json", "adapter_model.safetensors",
                                   "adapter_config.json", "subdir/", "__init__.py"])
def test_extra_members_are_refused_even_official_browser_assets(tmp_path, members, extra):
    path = tmp_path / "extra.paw"
    path.write_bytes(zip_bytes([*members.items(), (extra, b"{}")]))
    load_refused(path, "unexpected member", repr(extra))


def test_duplicate_member_hidden_behind_a_case_change_is_refused(tmp_path, members):
    path = tmp_path / "case.paw"
    path.write_bytes(zip_bytes([*members.items(), ("Meta.json", members["meta.json"])]))
    load_refused(path, "unexpected member 'Meta.json'")


# -- links and special files ---------------------------------------------------------------------

def test_a_link_member_is_refused_whatever_its_name(tmp_path, members):
    raw = zip_bytes(members.items())
    path = tmp_path / "link.paw"
    path.write_bytes(patch_zip_entry(raw, "adapter.gguf", "external_attr", 0o120777 << 16))
    load_refused(path, "'adapter.gguf' is a link")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path, members):
    fifo = tmp_path / "pipe.paw"
    os.mkfifo(fifo)
    load_refused(fifo, "not a regular file")  # opening a FIFO would block forever
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in members.items():
        (folder / name).write_bytes(data)
    (folder / "pseudo_program.txt").unlink()
    os.mkfifo(folder / "pseudo_program.txt")
    load_refused(folder, "pseudo_program.txt is not a regular file")


def test_a_folder_member_that_is_a_folder_is_refused(tmp_path, members):
    for name, data in members.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "meta.json").unlink()
    (tmp_path / "meta.json").mkdir()
    load_refused(tmp_path, "meta.json is not a regular file")


def test_an_oversized_folder_member_is_refused_before_reading(tmp_path, members):
    for name, data in members.items():
        (tmp_path / name).write_bytes(data)
    with open(tmp_path / "meta.json", "r+b") as f:
        f.truncate(8 * 1024 * 1024)  # sparse: 8 MiB declared, nothing to read
    load_refused(tmp_path, "meta.json is 8388608 bytes, more than its 1048576-byte limit")


# -- sizes: zip bombs and lying headers ----------------------------------------------------------

def test_a_real_deflate_bomb_is_refused_before_inflating(tmp_path, members):
    """32 MiB of zeros deflate to ~32 KB (1000:1): refused on the ratio, without inflating it."""
    bomb = b"GGUF" + bytes(32 * 1024 * 1024)
    path = tmp_path / "bomb.paw"
    path.write_bytes(zip_bytes([*((n, d) for n, d in members.items() if n != "adapter.gguf"), ("adapter.gguf", bomb)]))
    del bomb
    assert path.stat().st_size < 100_000
    peak = peak_while(lambda: load_refused(path, "adapter.gguf would expand", "zip bomb"))
    assert peak < 2 * 1024 * 1024, peak


def test_a_member_inflating_past_its_declared_size_is_cut_off(tmp_path, members):
    """Declared 2000 bytes, really 64 MiB: only declared + 1 bytes are ever inflated."""
    big = b"GGUF" + bytes(64 * 1024 * 1024)
    raw = zip_bytes([*((n, d) for n, d in members.items() if n != "adapter.gguf"), ("adapter.gguf", big)])
    del big
    path = tmp_path / "liar.paw"
    path.write_bytes(patch_zip_entry(raw, "adapter.gguf", "usize", 2000))
    peak = peak_while(lambda: load_refused(path, "adapter.gguf"))
    assert peak < 2 * 1024 * 1024, peak


def test_a_member_shorter_than_declared_is_refused(tmp_path, members):
    raw = zip_bytes(members.items(), compression=zipfile.ZIP_STORED)
    path = tmp_path / "short.paw"
    path.write_bytes(patch_zip_entry(raw, "meta.json", "usize", len(members["meta.json"]) + 100))
    load_refused(path, "meta.json")


def test_declared_total_beyond_the_limit_is_refused_before_reading(tmp_path, members):
    raw = zip_bytes([*members.items(), *((f"x{i}", b"x") for i in range(3))], compression=zipfile.ZIP_STORED)
    for i in range(3):
        raw = patch_zip_entry(raw, f"x{i}", "usize", 0xFFFF0000)
    path = tmp_path / "total.paw"
    path.write_bytes(raw)
    load_refused(path, "members expand to", "more than the 536870912-byte limit")


def test_an_archive_over_the_size_limit_is_refused_unread(tmp_path):
    path = tmp_path / "huge.paw"
    with open(path, "wb") as f:
        f.truncate(MAX_ARCHIVE_BYTES + 1)  # sparse
    load_refused(path, f"more than the {MAX_ARCHIVE_BYTES}-byte limit")


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_unusual_compression_methods_are_refused(tmp_path, members, method):
    path = tmp_path / "method.paw"
    path.write_bytes(zip_bytes(members.items(), compression=method))
    load_refused(path, f"uses ZIP compression method {method}", "stored or deflated")


def test_an_encrypted_member_is_refused(tmp_path, members):
    raw = zip_bytes(members.items(), compression=zipfile.ZIP_STORED)
    path = tmp_path / "enc.paw"
    path.write_bytes(patch_zip_entry(raw, "meta.json", "flags", 0x1))
    load_refused(path, "'meta.json' is encrypted")


def test_a_corrupted_member_fails_its_crc(tmp_path, members):
    raw = zip_bytes(members.items(), compression=zipfile.ZIP_STORED)
    path = tmp_path / "crc.paw"
    path.write_bytes(patch_zip_entry(raw, "prompt_template.txt", "crc", 0x12345678))
    load_refused(path, "prompt_template.txt cannot be read")


# -- meta.json and text members --------------------------------------------------------------------

def with_member(tmp_path, members, name, data) -> Path:
    path = tmp_path / "m.paw"
    path.write_bytes(zip_bytes([*((n, d) for n, d in members.items() if n != name), (name, data)]))
    return path


def test_huge_meta_json_is_refused_before_reading(tmp_path, members):
    huge = json.dumps({"spec": "x" * (2 * 1024 * 1024)}).encode()
    load_refused(with_member(tmp_path, members, "meta.json", huge), "meta.json declares", "more than its 1048576-byte limit")


def test_deeply_nested_meta_json_is_refused(tmp_path, members):
    path = with_member(tmp_path, members, "meta.json", b"[" * 200_000 + b"]" * 200_000)
    load_refused(path, "meta.json nests too deeply")


@pytest.mark.parametrize("field, value, expected", [
    ("lora_rank", "32", "expected an integer"),
    ("lora_rank", True, "expected an integer"),
    ("lora_rank", 32.5, "expected an integer"),
    ("lora_rank", -32, "expected a positive number"),
    ("lora_rank", 10**400, "expected a positive number"),
    ("lora_alpha", float("nan"), "expected a positive number"),
    ("lora_alpha", float("inf"), "expected a positive number"),
    ("lora_alpha", [16], "expected an integer or a number"),
    ("runtime_id", 7, "expected a string"),
    ("spec", {"a": 1}, "expected a string"),
    ("interpreter", ["gpt2"], "expected a string"),
    ("version", "4", "expected an integer"),
])
def test_meta_json_fields_must_have_their_types(tmp_path, members, field, value, expected):
    meta = json.loads(members["meta.json"])
    meta[field] = value
    load_refused(with_member(tmp_path, members, "meta.json", json.dumps(meta).encode()), f"field {field!r}", expected)


@pytest.mark.parametrize("name, data, expected", [
    ("meta.json", b'{"spec": "caf\xe9"}', "meta.json is not valid UTF-8 (byte 13)"),
    ("meta.json", "\ufeff{}".encode(), "meta.json is not valid JSON"),
    ("pseudo_program.txt", b"Task: \xc3\x28", "pseudo_program.txt is not valid UTF-8 (byte 6)"),
    ("prompt_template.txt", PLACEHOLDER.encode() + b"\xed\xa0\x80", "prompt_template.txt is not valid UTF-8"),  # a UTF-8-encoded surrogate
])
def test_text_members_must_be_utf8(tmp_path, members, name, data, expected):
    load_refused(with_member(tmp_path, members, name, data), expected)


def test_runtime_id_cannot_name_a_path(tmp_path, members, monkeypatch):
    """A program picks its interpreter by runtime_id; a path there is refused, never opened."""
    monkeypatch.setenv("PAW_LITE_MODELS", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    (tmp_path / "secret.gguf").write_bytes(b"not for programs")
    for rid in ("../secret", "/etc/passwd", "..", "a/b"):
        meta = json.loads(members["meta.json"])
        meta["runtime_id"] = rid
        path = with_member(tmp_path, members, "meta.json", json.dumps(meta).encode())
        with pytest.raises(ModelNotFoundError, match="not a valid model file name"):
            paw_lite.function(path, cache_dir=tmp_path / "cache")


# -- nothing written outside the cache ---------------------------------------------------------------

def test_running_an_untrusted_program_writes_only_to_the_cache(tmp_path, tiny_program, tiny_gguf):
    """A real `paw-lite run` in a subprocess whose home, temp dir and working dir are empty folders:
    afterwards only the cache folder holds anything (the prefix cache; the adapter is read from memory), and the
    program's own folder is unchanged. The same for a program whose adapter is refused."""
    home, tmp, cwd, cache, progs = (tmp_path / d for d in ("home", "tmp", "cwd", "cache", "progs"))
    for d in (home, tmp, cwd, progs):
        d.mkdir()
    good = progs / "good.paw"
    good.write_bytes(tiny_program.read_bytes())
    members = Program.load(good).members()
    bad = progs / "bad.paw"
    bad.write_bytes(zip_bytes([*((n, d) for n, d in members.items() if n != "adapter.gguf"),
                               ("adapter.gguf", members["adapter.gguf"][:4] + b"\x09\x00\x00\x00" + members["adapter.gguf"][8:])]))
    before = tree(progs)
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache"),
           "PAW_LITE_CACHE": str(cache), "PAW_LITE_MODELS": str(home / "models")}
    run = [sys.executable, "-m", "paw_lite", "run", "--base-model", str(tiny_gguf), "--max-tokens", "3"]
    ok = subprocess.run([*run, str(good), "some input"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([*run, str(bad), "some input"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "bad.paw: adapter.gguf: GGUF version 9 is not supported" in refused.stderr, refused.stderr
    assert tree(home) == {} and tree(tmp) == {} and tree(cwd) == {}
    assert tree(progs) == before
    files = [p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].startswith("prefix/") and files[0].endswith(".kv"), files
    assert not (cache / "tmp").exists()


def test_without_the_prefix_cache_nothing_is_written_outside_the_cache_either(tmp_path, tiny_program, tiny_gguf, monkeypatch):
    import tempfile

    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    with paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path / "cache", prefix_cache_enabled=False) as f:
        f("some input", max_tokens=2)
    assert tree(systmp) == {}
