"""PAW programs: the official `.paw` bundle (a ZIP) and unpacked program folders, both ways.

Reading follows the official importer's rules (the official SDK's importer, programasweights 0.4.14 client.py); nothing is extracted to disk."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import InvalidFileError, PawError, regular_file_size
from .families import COMPACT, FAMILIES, Family, family_of_interpreter

log = logging.getLogger("paw_lite")

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
# Compression above 100:1 is refused for members over 1 MiB: real adapters hold near-random
# quantized numbers (~1.1:1); a higher ratio is a zip bomb, or a degenerate all-zero adapter.
MAX_COMPRESSION_RATIO = 100
# STORED and DEFLATED are what ZIP writers (and the browser SDK's reader) use; the others only add
# decompressor code that a hostile file could reach.
COMPRESSION_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
SUPPORTED_INTERPRETERS = tuple(f.interpreter for f in FAMILIES.values())  # "gpt2" (Compact), "Qwen/Qwen3-0.6B" (Standard)
# meta.json versions of the published programs. Another version still runs (the members are what
# a version change would alter, and they are checked), with a warning: its meaning is unknown here.
KNOWN_META_VERSIONS = (3, 4)
# Checked when writing, not when reading: a program written elsewhere still runs.
_PROGRAM_ID = re.compile(r"[0-9a-f]{20}")
# meta.json fields paw_lite reads, with the JSON types they must have (null counts as absent).
_META_TYPES: dict[str, tuple[type, ...]] = {
    "version": (int,), "program_id": (str,), "spec": (str,), "interpreter": (str,), "runtime_id": (str,),
    "compiler_snapshot": (str,), "lora_rank": (int,), "lora_alpha": (int, float), "prefix_steps": (int,),
}


@dataclass(frozen=True)
class Program:
    """A program in memory: its metadata, prompt template, pseudo-program and adapter bytes."""

    meta: dict[str, Any]
    template: str = field(repr=False)
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
    def family(self) -> Family:
        """Compact (GPT-2) or Standard (Qwen3-0.6B), from meta.json `interpreter` (absent: GPT-2,
        as in early programs). `from_members` has checked it."""
        return family_of_interpreter(self.meta.get("interpreter", COMPACT.interpreter), self.source)

    @property
    def runtime_id(self) -> str:
        """The interpreter's name: it runs on `<runtime_id>.gguf` from the models directory (as the
        official SDK picks it); meta.json's, else the family's."""
        return self.meta.get("runtime_id") or self.family.runtime_id

    @property
    def prefix(self) -> str:
        return self.template.split(PLACEHOLDER, 1)[0]

    @property
    def suffix(self) -> str:
        return self.template.split(PLACEHOLDER, 1)[1]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Program":
        """Read a `.paw` bundle or an unpacked program folder."""
        path = Path(path).expanduser()
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
        meta = _parse_meta(_text(members, META, source), source)
        family_of_interpreter(meta.get("interpreter", COMPACT.interpreter), source)
        template = _text(members, TEMPLATE, source)
        count = template.count(PLACEHOLDER)
        if count != 1:
            raise InvalidFileError(f"{source}: {TEMPLATE} holds {count} {PLACEHOLDER} markers, expected exactly one")
        pseudo = _text(members, PSEUDO_PROGRAM, source) if PSEUDO_PROGRAM in members else None
        return cls(meta=meta, template=template, adapter_gguf=adapter, pseudo_program=pseudo, source=source)

    def checked(self) -> "Program":
        """This program as `load` would accept it (member sizes, one template marker, metadata
        types, adapter magic and size, interpreter): for a Program built in memory. Returns the
        program re-read from its members (a copy: JSON turns tuples into lists); raises as `load` does."""
        fields = (("meta", self.meta, dict, "a dict"), ("template", self.template, str, "a str"),
                  ("adapter_gguf", self.adapter_gguf, bytes, "bytes"),
                  ("pseudo_program", self.pseudo_program, (str, type(None)), "a str or None"))
        for name, value, kinds, expected in fields:
            if not isinstance(value, kinds):
                raise TypeError(f"{self.source}: Program.{name} is a {type(value).__name__}; expected {expected}")
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError, RecursionError) as exc:  # a NumPy number, say: JSON has no such type
            raise InvalidFileError(f"{self.source}: Program.meta is not JSON-serialisable ({exc}); "
                                   f"use plain int, float and str values") from None
        for name, text in (("template", self.template), ("pseudo_program", self.pseudo_program or "")):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidFileError(f"{self.source}: Program.{name} is not valid text (a lone surrogate at "
                                       f"{exc.start})") from None
        members = self.members()
        for name, data in members.items():
            if len(data) > MAX_MEMBER_BYTES[name]:
                raise InvalidFileError(f"{self.source}: {name} is {len(data)} bytes, more than the "
                                       f"{MAX_MEMBER_BYTES[name]}-byte limit of a program's members")
        return type(self).from_members(members, self.source)

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
        path = Path(path).expanduser()
        try:
            members = self.members()
        except TypeError as exc:  # a NumPy number in meta, say: JSON has no such type
            raise PawError(f"{path}: meta.json cannot be written: {exc}; use plain int, float and str values") from None
        for name, data in members.items():  # refuse to write what we would refuse to read
            if len(data) > MAX_MEMBER_BYTES[name]:
                raise PawError(f"{path}: {name} would be {len(data)} bytes, more than the {MAX_MEMBER_BYTES[name]}-byte "
                               f"limit every reader of this bundle applies; shorten the spec or pseudo-program")
        Program.from_members(members, str(path))
        program_id = self.meta.get("program_id")
        if program_id is not None and not _PROGRAM_ID.fullmatch(program_id):
            raise PawError(f"{path}: meta.json field 'program_id' is {program_id!r:.80}; official programs carry 20 "
                           f"lowercase hex digits (paw_lite.program.content_program_id computes one)")
        with atomic_path(path) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
        return path


def content_program_id(adapter_gguf: bytes, template: str, pseudo_program: str | None, spec: str | None) -> str:
    """paw_lite's content address for programs it writes: 20 hex digits of a sha256 over the parts."""
    h = hashlib.sha256()
    for part in (adapter_gguf, template.encode(), (pseudo_program or "").encode(), (spec or "").encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:20]


def _parse_meta(text: str, source: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise InvalidFileError(f"{source}: {META} is not valid JSON: {exc}") from exc
    except RecursionError:  # a few kilobytes of "[[[[..." exhaust the parser's stack
        raise InvalidFileError(f"{source}: {META} nests too deeply to be a program's metadata") from None
    if not isinstance(meta, dict):
        raise InvalidFileError(f"{source}: {META} must hold a JSON object")
    for key, types in _META_TYPES.items():
        value = meta.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join("an integer" if t is int else "a number" if t is float else "a string" for t in types)
            raise InvalidFileError(f"{source}: {META} field {key!r} is {value!r:.80}, expected {expected}")
    for key in ("lora_rank", "lora_alpha"):
        value = meta.get(key)
        if value is not None and not (value > 0 and _fits_float(value)):
            raise InvalidFileError(f"{source}: {META} field {key!r} is {value!r:.80}, expected a positive number")
    version = meta.get("version")
    if version is not None and version not in KNOWN_META_VERSIONS:
        log.warning("%s: %s says version %d; paw_lite knows the published versions %s and runs it as those are run: "
                    "if its outputs look wrong, check for a newer paw-lite", source, META, version,
                    " and ".join(map(str, KNOWN_META_VERSIONS)))
    return meta


def _fits_float(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        return False


def _text(members: dict[str, bytes], name: str, source: str) -> str:
    try:
        return members[name].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidFileError(f"{source}: {name} is not valid UTF-8 (byte {exc.start})") from exc


# What zipfile raises on malformed archives: a name that is not UTF-8 is a ValueError, a bad
# deflate stream a zlib.error, a short read an EOFError, a bad seek an OSError, an encrypted member
# a RuntimeError, a member that "needs zip version 25.5" (found by tests/test_fuzz_readers.py) a
# NotImplementedError.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, struct.error, OverflowError,
               NotImplementedError, RuntimeError)


def _read_bundle(path: Path) -> dict[str, bytes]:
    size = regular_file_size(path)
    if size > MAX_ARCHIVE_BYTES:
        raise InvalidFileError(f"{path}: bundle is {size} bytes, more than the {MAX_ARCHIVE_BYTES}-byte limit")
    try:
        zf = zipfile.ZipFile(path)
    except PermissionError as exc:  # the file may be fine: say what is wrong
        raise InvalidFileError(f"{path}: cannot read the bundle: {exc.strerror}") from exc
    except ZIP_ERRORS as exc:
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
    if info.compress_type not in COMPRESSION_METHODS:
        raise InvalidFileError(f"{path}: member {name} uses ZIP compression method {info.compress_type}; "
                               f"a .paw bundle uses {' or '.join(COMPRESSION_METHODS.values())}")
    limit = MAX_MEMBER_BYTES[name]
    if info.file_size > limit:
        raise InvalidFileError(f"{path}: member {name} declares {info.file_size} bytes, more than its {limit}-byte limit")
    if info.file_size > 1024 * 1024 and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise InvalidFileError(f"{path}: member {name} would expand {info.file_size // max(info.compress_size, 1)}:1 "
                               f"(more than {MAX_COMPRESSION_RATIO}:1): refused as a zip bomb")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    """Read at most the declared size plus one byte, so a lying header cannot make us read more."""
    try:
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)
    except ZIP_ERRORS as exc:
        raise InvalidFileError(f"{path}: member {info.filename} cannot be read: {exc}") from exc
    if len(data) != info.file_size:
        raise InvalidFileError(f"{path}: member {info.filename} holds {len(data)} bytes but declares {info.file_size}")
    return data


def _read_folder(folder: Path) -> dict[str, bytes]:
    members = {}
    for name in MEMBERS:
        p = folder / name
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise InvalidFileError(f"{folder}: {name} is a link; links are not allowed")
        if not stat.S_ISREG(st.st_mode):
            raise InvalidFileError(f"{folder}: {name} is not a regular file")
        limit = MAX_MEMBER_BYTES[name]
        if st.st_size > limit:
            raise InvalidFileError(f"{folder}: {name} is {st.st_size} bytes, more than its {limit}-byte limit")
        with open(p, "rb") as f:
            members[name] = f.read(limit + 1)  # bounded even if the file grows after the check
        if len(members[name]) > limit:
            raise InvalidFileError(f"{folder}: {name} grew past its {limit}-byte limit while being read")
    return members
