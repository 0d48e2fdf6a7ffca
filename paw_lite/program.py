"""PAW programs: the official `.paw` bundle (a ZIP) and unpacked program folders, both ways.

Reading follows the official importer's rules (PAW-FACTS §4); nothing is extracted to disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import IncompatibleModelError, InvalidFileError, PawError

PLACEHOLDER = "{INPUT_PLACEHOLDER}"
META = "meta.json"
ADAPTER = "adapter.gguf"
TEMPLATE = "prompt_template.txt"
PSEUDO_PROGRAM = "pseudo_program.txt"
REQUIRED_MEMBERS = (META, ADAPTER, TEMPLATE)
MEMBERS = (*REQUIRED_MEMBERS, PSEUDO_PROGRAM)

# The official importer's limits.
MAX_ARCHIVE_BYTES = 256 * 1024 * 1024
MAX_MEMBER_COUNT = 256
MAX_EXPANDED_BYTES = 512 * 1024 * 1024
MIN_ADAPTER_BYTES = 1024
# paw_lite's own, tighter per-member limits: text members are small in every real program.
MAX_MEMBER_BYTES = {META: 1024 * 1024, TEMPLATE: 1024 * 1024, PSEUDO_PROGRAM: 1024 * 1024, ADAPTER: MAX_ARCHIVE_BYTES}
MAX_COMPRESSION_RATIO = 1000
SUPPORTED_INTERPRETERS = ("gpt2",)


@dataclass(frozen=True)
class Program:
    """A program in memory: its metadata, prompt template, pseudo-program and adapter bytes."""

    meta: dict[str, Any]
    template: str
    adapter_gguf: bytes = field(repr=False)
    pseudo_program: str | None = None
    source: str = "<memory>"

    @property
    def spec(self) -> str | None:
        return self.meta.get("spec")

    @property
    def program_id(self) -> str | None:
        return self.meta.get("program_id")

    @property
    def prefix(self) -> str:
        return self.template.split(PLACEHOLDER, 1)[0]

    @property
    def suffix(self) -> str:
        return self.template.split(PLACEHOLDER, 1)[1]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Program":
        """Read a `.paw` bundle or an unpacked program folder."""
        path = Path(path)
        if path.is_dir():
            members = _read_folder(path)
        elif path.exists():
            members = _read_bundle(path)
        else:
            raise InvalidFileError(f"{path}: no such program (a .paw file or a program folder)")
        return cls.from_members(members, str(path))

    @classmethod
    def from_members(cls, members: dict[str, bytes], source: str) -> "Program":
        for name in REQUIRED_MEMBERS:
            if name not in members:
                raise InvalidFileError(f"{source}: member {name} is missing (a program holds {', '.join(REQUIRED_MEMBERS)})")
        adapter = members[ADAPTER]
        if not adapter.startswith(b"GGUF"):
            raise InvalidFileError(f"{source}: {ADAPTER} does not start with the GGUF magic")
        if len(adapter) < MIN_ADAPTER_BYTES:
            raise InvalidFileError(f"{source}: {ADAPTER} is {len(adapter)} bytes, the minimum is {MIN_ADAPTER_BYTES}")
        try:
            meta = json.loads(_text(members, META, source))
        except ValueError as exc:
            raise InvalidFileError(f"{source}: {META} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise InvalidFileError(f"{source}: {META} must hold a JSON object")
        interpreter = meta.get("interpreter", "gpt2")
        if interpreter not in SUPPORTED_INTERPRETERS:
            raise IncompatibleModelError(f"{source}: {META} says interpreter {interpreter!r}; paw_lite runs {', '.join(SUPPORTED_INTERPRETERS)} programs")
        template = _text(members, TEMPLATE, source)
        count = template.count(PLACEHOLDER)
        if count != 1:
            raise InvalidFileError(f"{source}: {TEMPLATE} holds {count} {PLACEHOLDER} markers, expected exactly one")
        pseudo = _text(members, PSEUDO_PROGRAM, source) if PSEUDO_PROGRAM in members else None
        return cls(meta=meta, template=template, adapter_gguf=adapter, pseudo_program=pseudo, source=source)

    @contextlib.contextmanager
    def adapter_file(self, scratch_dir: Path) -> Iterator[Path]:
        """The adapter as a private temporary file (gguf-py reads from paths), removed afterwards.
        Errors raised inside name the program's member instead of the temporary path."""
        scratch_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch_dir) as tmp:
            path = Path(tmp) / ADAPTER
            path.write_bytes(self.adapter_gguf)
            try:
                yield path
            except PawError as exc:
                raise type(exc)(str(exc).replace(str(path), f"{self.source}: {ADAPTER}")) from None

    def members(self) -> dict[str, bytes]:
        out = {
            META: (json.dumps(self.meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
            ADAPTER: self.adapter_gguf,
            TEMPLATE: self.template.encode("utf-8"),
        }
        if self.pseudo_program is not None:
            out[PSEUDO_PROGRAM] = self.pseudo_program.encode("utf-8")
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a `.paw` bundle atomically."""
        path = Path(path)
        Program.from_members(self.members(), str(path))  # refuse to write what we would refuse to read
        with atomic_path(path) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name, data in self.members().items():
                    zf.writestr(name, data)
        return path


def content_program_id(adapter_gguf: bytes, template: str, pseudo_program: str | None, spec: str | None) -> str:
    """paw_lite's content address for programs it writes: 20 hex digits of a sha256 over the parts."""
    h = hashlib.sha256()
    for part in (adapter_gguf, template.encode(), (pseudo_program or "").encode(), (spec or "").encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:20]


def _text(members: dict[str, bytes], name: str, source: str) -> str:
    try:
        return members[name].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidFileError(f"{source}: {name} is not valid UTF-8 (byte {exc.start})") from exc


def _read_bundle(path: Path) -> dict[str, bytes]:
    size = path.stat().st_size
    if size > MAX_ARCHIVE_BYTES:
        raise InvalidFileError(f"{path}: bundle is {size} bytes, more than the {MAX_ARCHIVE_BYTES}-byte limit")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InvalidFileError(f"{path}: not a valid .paw bundle (ZIP): {exc}") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBER_COUNT:
            raise InvalidFileError(f"{path}: {len(infos)} members, more than the limit of {MAX_MEMBER_COUNT}")
        total = sum(i.file_size for i in infos)
        if total > MAX_EXPANDED_BYTES:
            raise InvalidFileError(f"{path}: members expand to {total} bytes, more than the {MAX_EXPANDED_BYTES}-byte limit")
        seen: set[str] = set()
        for info in infos:
            _check_member(path, info, seen)
        members = {}
        for info in infos:
            members[info.filename] = _read_member(zf, info, path)
    return members


def _check_member(path: Path, info: zipfile.ZipInfo, seen: set[str]) -> None:
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InvalidFileError(f"{path}: member {name!r} is a link; links are not allowed")
    if name not in MEMBERS:
        raise InvalidFileError(f"{path}: unexpected member {name!r} (a .paw bundle holds only {', '.join(MEMBERS)})")
    if name in seen:
        raise InvalidFileError(f"{path}: member {name!r} appears twice")
    seen.add(name)
    if info.flag_bits & 0x1:
        raise InvalidFileError(f"{path}: member {name!r} is encrypted")
    limit = MAX_MEMBER_BYTES[name]
    if info.file_size > limit:
        raise InvalidFileError(f"{path}: member {name} declares {info.file_size} bytes, more than its {limit}-byte limit")
    if info.file_size > 1024 * 1024 and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise InvalidFileError(f"{path}: member {name} expands {info.file_size // max(info.compress_size, 1)}:1, a zip bomb")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    """Read at most the declared size plus one byte, so a lying header cannot make us read more."""
    try:
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise InvalidFileError(f"{path}: member {info.filename} cannot be read: {exc}") from exc
    if len(data) != info.file_size:
        raise InvalidFileError(f"{path}: member {info.filename} holds {len(data)} bytes but declares {info.file_size}")
    return data


def _read_folder(folder: Path) -> dict[str, bytes]:
    members = {}
    for name in MEMBERS:
        p = folder / name
        if p.is_symlink():
            raise InvalidFileError(f"{folder}: {name} is a link; links are not allowed")
        if not p.exists():
            continue
        if not p.is_file():
            raise InvalidFileError(f"{folder}: {name} is not a regular file")
        size = p.stat().st_size
        if size > MAX_MEMBER_BYTES[name]:
            raise InvalidFileError(f"{folder}: {name} is {size} bytes, more than its {MAX_MEMBER_BYTES[name]}-byte limit")
        members[name] = p.read_bytes()
    return members
