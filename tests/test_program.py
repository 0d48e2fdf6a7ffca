"""The .paw bundle reader applies every rule of the official importer, with clear messages."""

from __future__ import annotations

import json
import zipfile

import pytest

from paw_lite.errors import IncompatibleModelError, InvalidFileError
from paw_lite.program import PLACEHOLDER, Program


@pytest.fixture(scope="module")
def members(tiny_program):
    return Program.load(tiny_program).members()


def write_zip(path, entries, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for entry in entries:
            if isinstance(entry, zipfile.ZipInfo):
                zf.writestr(entry, b"x")
            else:
                zf.writestr(*entry)
    return path


def test_round_trip_bundle_and_folder(tmp_path, tiny_program, members):
    prog = Program.load(tiny_program)
    assert prog.spec and prog.template.count(PLACEHOLDER) == 1
    again = Program.load(prog.save(tmp_path / "copy.paw"))
    assert again.members() == members
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in members.items():
        (folder / name).write_bytes(data)
    assert Program.load(folder).members() == members


def test_save_writes_exactly_what_it_was_given(tmp_path, members):
    """Checked with zipfile itself, not with Program.load: a member the writer and the reader both
    dropped would pass a save-then-load comparison."""
    from paw_lite.program import MEMBERS

    meta = {"version": 4, "program_id": "0123456789abcdef0123", "spec": "spec ✓", "interpreter": "gpt2", "lora_rank": 32}
    template = "[PSEUDO_PROGRAM]\nTask: ✓\n[END_PSEUDO_PROGRAM]\n\n[INPUT]\n" + PLACEHOLDER + "\n[END_INPUT]"
    adapter = members["adapter.gguf"]
    path = Program(meta=meta, template=template, adapter_gguf=adapter, pseudo_program="Task: ✓").save(tmp_path / "p.paw")
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == sorted(MEMBERS)
        assert json.loads(zf.read("meta.json").decode("utf-8")) == meta
        assert zf.read("prompt_template.txt") == template.encode("utf-8")
        assert zf.read("pseudo_program.txt") == "Task: ✓".encode("utf-8")
        assert zf.read("adapter.gguf") == adapter
    loaded = Program.load(path)
    assert (loaded.meta, loaded.template, loaded.pseudo_program, loaded.adapter_gguf) == (meta, template, "Task: ✓", adapter)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("meta.json"), "member meta.json is missing"),
    (lambda m: m.pop("adapter.gguf"), "member adapter.gguf is missing"),
    (lambda m: m.pop("prompt_template.txt"), "member prompt_template.txt is missing"),
    (lambda m: m.__setitem__("extra.bin", b"x"), "unexpected member 'extra.bin'"),
    (lambda m: m.__setitem__("../evil.txt", b"x"), "unexpected member '../evil.txt'"),
    (lambda m: m.__setitem__("/abs/meta.json", b"x"), "unexpected member '/abs/meta.json'"),
    (lambda m: m.__setitem__("prompt_template.txt", b"no placeholder"), "holds 0 {INPUT_PLACEHOLDER} markers"),
    (lambda m: m.__setitem__("prompt_template.txt", (PLACEHOLDER * 2).encode()), "holds 2 {INPUT_PLACEHOLDER} markers"),
    (lambda m: m.__setitem__("prompt_template.txt", b"\xff\xfe" + PLACEHOLDER.encode()), "prompt_template.txt is not valid UTF-8"),
    (lambda m: m.__setitem__("meta.json", b"{not json"), "meta.json is not valid JSON"),
    (lambda m: m.__setitem__("meta.json", b"[1, 2]"), "must hold a JSON object"),
    (lambda m: m.__setitem__("adapter.gguf", b"GGML" + b"\0" * 2000), "does not start with the GGUF magic"),
    (lambda m: m.__setitem__("adapter.gguf", b"GGUF" + b"\0" * 100), "is 104 bytes, the minimum is 1024"),
])
def test_rejections(tmp_path, members, mutate, message):
    m = dict(members)
    mutate(m)
    path = write_zip(tmp_path / "bad.paw", m.items())
    with pytest.raises(InvalidFileError, match=r"bad\.paw") as exc:
        Program.load(path)
    assert message in str(exc.value)


def test_other_interpreter_is_refused(tmp_path, members):
    m = dict(members)
    m["meta.json"] = json.dumps({"interpreter": "qwen3-0.6b"}).encode()
    with pytest.raises(IncompatibleModelError, match="interpreter 'qwen3-0.6b'"):
        Program.load(write_zip(tmp_path / "q.paw", m.items()))


def test_duplicate_member_is_refused(tmp_path, members):
    entries = list(members.items()) + [("meta.json", members["meta.json"])]
    with pytest.warns(UserWarning):
        path = write_zip(tmp_path / "dup.paw", entries)
    with pytest.raises(InvalidFileError, match="appears twice"):
        Program.load(path)


def test_symlink_member_is_refused(tmp_path, members):
    link = zipfile.ZipInfo("pseudo_program.txt")
    link.external_attr = (0o120777 << 16)
    entries = [(n, d) for n, d in members.items() if n != "pseudo_program.txt"] + [link]
    path = write_zip(tmp_path / "link.paw", entries)
    with pytest.raises(InvalidFileError, match="is a link"):
        Program.load(path)


def test_folder_symlink_is_refused(tmp_path, members):
    folder = tmp_path / "f"
    folder.mkdir()
    for name, data in members.items():
        (folder / name).write_bytes(data)
    (folder / "pseudo_program.txt").unlink()
    (folder / "pseudo_program.txt").symlink_to("/etc/passwd")
    with pytest.raises(InvalidFileError, match="is a link"):
        Program.load(folder)


def test_too_many_members_is_refused(tmp_path, members):
    entries = list(members.items()) + [(f"x{i}", b"") for i in range(260)]
    with pytest.raises(InvalidFileError, match="more than the limit of 256"):
        Program.load(write_zip(tmp_path / "many.paw", entries))


def test_zip_bomb_is_refused(tmp_path, members):
    m = dict(members)
    m["prompt_template.txt"] = PLACEHOLDER.encode() + b" " * (2 * 1024 * 1024)
    with pytest.raises(InvalidFileError, match="more than its 1048576-byte limit"):
        Program.load(write_zip(tmp_path / "bomb.paw", m.items()))


def test_lying_size_header_is_refused(tmp_path, members):
    path = write_zip(tmp_path / "lie.paw", members.items(), compression=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    # shrink the declared size of meta.json in the central directory
    name = b"meta.json"
    cd = raw.find(b"PK\x01\x02")
    while raw[cd + 46:cd + 46 + len(name)] != name:
        cd = raw.find(b"PK\x01\x02", cd + 4)
    declared = int.from_bytes(raw[cd + 24:cd + 28], "little")
    raw[cd + 24:cd + 28] = (declared - 5).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidFileError, match="lie.paw"):
        Program.load(path)


def test_not_a_zip(tmp_path):
    p = tmp_path / "junk.paw"
    p.write_bytes(b"hello world")
    with pytest.raises(InvalidFileError, match=r"junk\.paw: not a valid \.paw bundle"):
        Program.load(p)
    with pytest.raises(InvalidFileError, match="no such program"):
        Program.load(tmp_path / "missing.paw")


def test_save_refuses_a_bad_template(tmp_path, members):
    prog = Program.from_members(members, "x")
    bad = Program(meta=prog.meta, template="no marker", adapter_gguf=prog.adapter_gguf)
    with pytest.raises(InvalidFileError):
        bad.save(tmp_path / "out.paw")
    assert not (tmp_path / "out.paw").exists()
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_bundle_is_not_called_invalid(tmp_path, tiny_program, monkeypatch):
    def refused(*args, **kwargs):  # root reads any file, so a refusal is simulated
        raise PermissionError(13, "Permission denied", str(tiny_program))

    monkeypatch.setattr(zipfile, "ZipFile", refused)
    with pytest.raises(InvalidFileError, match=r"cannot read the bundle: Permission denied$"):
        Program.load(tiny_program)


def test_save_refuses_what_load_would_refuse(tmp_path, tiny_program):
    import numpy as np

    from paw_lite.errors import PawError

    prog = Program.load(tiny_program)
    huge = Program({**prog.meta, "spec": "x" * (1024 * 1024)}, prog.template, prog.adapter_gguf, prog.pseudo_program)
    with pytest.raises(PawError, match=r"meta.json would be \d+ bytes, more than the 1048576-byte limit"):
        huge.save(tmp_path / "huge.paw")
    numpy_meta = Program({**prog.meta, "lora_rank": np.int64(32)}, prog.template, prog.adapter_gguf, prog.pseudo_program)
    with pytest.raises(PawError, match="meta.json cannot be written: .*use plain int, float and str values"):
        numpy_meta.save(tmp_path / "np.paw")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_program_id_official_tools_would_not_write(tmp_path, tiny_program):
    from paw_lite.errors import PawError

    prog = Program.load(tiny_program)
    for bad in ("ABCDEF0123456789ABCD", "abc", "0123456789abcdef01234", "../../etc/passwd"):
        edited = Program({**prog.meta, "program_id": bad}, prog.template, prog.adapter_gguf, prog.pseudo_program)
        with pytest.raises(PawError, match="field 'program_id' is .*20 lowercase hex digits"):
            edited.save(tmp_path / "bad.paw")
    assert list(tmp_path.iterdir()) == []
    # Reading stays lenient: a program written by another tool with another id still loads.
    members = Program({**prog.meta, "program_id": "not-ours"}, prog.template, prog.adapter_gguf,
                      prog.pseudo_program).members()
    with zipfile.ZipFile(tmp_path / "other.paw", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    assert Program.load(tmp_path / "other.paw").program_id == "not-ours"


@pytest.mark.parametrize("version, warned", [(3, False), (4, False), (None, False), (5, True), (99, True), (0, True)])
def test_an_unknown_meta_version_runs_with_a_warning(tmp_path, members, caplog, version, warned):
    """Published programs say version 3 or 4; another version still loads (its members pass the
    same checks) but the user is told its meaning is unknown here."""
    import logging

    meta = json.loads(members["meta.json"])
    meta.pop("version", None)
    if version is not None:
        meta["version"] = version
    folder = tmp_path / "program"
    folder.mkdir()
    for name, data in {**members, "meta.json": json.dumps(meta).encode()}.items():
        (folder / name).write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="paw_lite"):
        assert Program.load(folder).meta.get("version") == version
    warnings = [r.getMessage() for r in caplog.records if "says version" in r.getMessage()]
    assert len(warnings) == int(warned)
    if warned:
        assert f"meta.json says version {version}; paw_lite knows the published versions 3 and 4" in warnings[0]
