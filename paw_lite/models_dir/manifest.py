"""What the models directory should hold (models/manifest.json, installed as paw_lite.models) and
what paw-lite wrote there (installed.json: each file's role, size, sha256 and source).

Each file has a role (interpreter, compiler, mapper, compiler_meta, pseudo_compiler) in a program
family (compact: GPT-2 programs; standard: Qwen3-0.6B programs); the pseudo compiler serves both."""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths
from ..atomic import atomic_path
from ..base_model import file_sha256
from ..errors import InvalidFileError, ModelNotFoundError
from ..families import FAMILIES

# models/ is installed as the package paw_lite.models (pyproject package-dir), so this works from an
# installed wheel as well as from the source tree.
MANIFEST_PATH = Path(str(importlib.resources.files("paw_lite.models").joinpath("manifest.json")))
INSTALLED = "installed.json"
ROLES = ("interpreter", "compiler", "mapper", "compiler_meta", "pseudo_compiler")
QUANT_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")


SHARED = "both"  # the family of a file both families use (the pseudo compiler)


@dataclass(frozen=True)
class ManifestEntry:
    name: str  # may hold {quant}
    role: str
    family: str  # "compact", "standard" or SHARED
    serves: tuple[str, ...]
    source: dict[str, Any]
    bytes: int | None = None
    sha256: str | None = None
    default_quant: str | None = None

    def serves_family(self, family: str) -> bool:
        return self.family in (family, SHARED)

    def file_name(self, quant: str | None = None) -> str:
        return self.name.format(quant=quant or self.default_quant) if "{quant}" in self.name else self.name

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.name.replace("{quant}", "*"))

    def quant_in(self, name: str) -> str | None:
        """The quantization a matching file name states, for names with {quant}."""
        if "{quant}" not in self.name or not self.matches(name):
            return None
        before, after = self.name.split("{quant}")
        return name[len(before):len(name) - len(after)]


def load_manifest(path: Path | None = None) -> list[ManifestEntry]:
    """Every file of the models directory, families in order (compact, standard, then shared files)."""
    path = path or MANIFEST_PATH
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [ManifestEntry(name=e["name"], role=e["role"], family=e["family"], serves=tuple(e["serves"]),
                                 source=e["source"], bytes=e.get("bytes"), sha256=e.get("sha256"),
                                 default_quant=e.get("default_quant"))
                   for e in data["files"]]
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"{path}: the models manifest is missing (reinstall paw-lite from its source tree)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidFileError(f"{path}: malformed models manifest: {exc}") from exc
    bad = [e.name for e in entries if e.role not in ROLES or e.family not in (*FAMILIES, SHARED)]
    keys = [(e.family, e.role) for e in entries]
    if bad or len(set(keys)) != len(keys):
        raise InvalidFileError(f"{path}: malformed models manifest: unknown role or family of {bad}, or a role listed twice")
    return entries


def manifest_entry(family: str, role: str, manifest: list[ManifestEntry] | None = None) -> ManifestEntry:
    """The file that plays `role` for `family`'s programs."""
    for e in manifest if manifest is not None else load_manifest():
        if e.role == role and e.serves_family(family):
            return e
    raise InvalidFileError(f"{MANIFEST_PATH}: no {role} of the {family} family (reinstall paw-lite from its source tree)")


def read_installed(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / INSTALLED
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidFileError(f"{path}: unreadable record of installed models ({exc}); delete it and re-import") from exc
    bad = [name for name, record in data.items() if not isinstance(record, dict)] if isinstance(data, dict) else ["(the whole file)"]
    if bad:
        raise InvalidFileError(f"{path}: malformed record of installed models (entry {bad[0]!r} is not an object); "
                               f"delete it and re-import")
    return data


def record_installed(directory: Path, name: str, role: str, source: str, how: str, family: str) -> dict[str, Any]:
    path = directory / name
    info = {"role": role, "family": family, "bytes": path.stat().st_size, "sha256": file_sha256(path), "source": source,
            "how": how}
    records = read_installed(directory)
    records[name] = info
    with atomic_path(directory / INSTALLED) as tmp:
        tmp.write_text(json.dumps(records, indent=2, sort_keys=True), encoding="utf-8")
    return {"name": name, **info}


def models_directory(override: str | os.PathLike[str] | None = None) -> Path:
    return Path(override).expanduser() if override else paths.models_dir()
