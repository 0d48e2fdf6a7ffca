"""`paw-lite models import DIR`: find what a folder of downloads holds for each role of each program
family, check it all, then copy the published files and convert the rest into the models directory.

Which family a compiler, mapper or meta.json belongs to is read from the compiler's meta.json beside
it (its `interpreter_model`), as the published repos paw-4b-gpt2 and paw-4b-qwen3-0.6b lay them out;
a Qwen3 GGUF without the `<prefix_k>` tokens is the Standard interpreter when it has Qwen3-0.6B's
shape or the published file's name, else the pseudo compiler."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, checked_or_removed, created_folder
from ..base_model import file_sha256
from ..errors import IncompatibleModelError, InvalidFileError, ModelNotFoundError, PawError
from ..families import COMPACT, FAMILIES, STANDARD
from .manifest import ROLES, SHARED, ManifestEntry, load_manifest, manifest_entry, read_installed, record_installed
from .verify import ShapeSourceError, check_file, installed_mapper_shape, quant_of_meta

log = logging.getLogger(__name__)


# Both compilers are Qwen3-4B-Instruct-2507 (the trained one fine-tuned from it): (layers, width).
PUBLISHED_QWEN3_SHAPE = (36, 2560)
# The Standard programs' interpreter, Qwen3-0.6B (Qwen/Qwen3-0.6B's config.json): (layers, width).
STANDARD_INTERPRETER_SHAPE = (28, 1024)


def _warn_unless_published_shape(path: Path, role: str, n_layer: int, n_embd: int) -> None:
    """Another Qwen3 imports and runs, but is not the model the reference system compiles with."""
    if (n_layer, n_embd) != PUBLISHED_QWEN3_SHAPE:
        layers, width = PUBLISHED_QWEN3_SHAPE
        log.warning("%s: a %d-layer, %d-wide Qwen3, not the published Qwen3-4B (%d layers, %d wide); imported as the %s, "
                    "but programs compiled with it will differ from the reference system's", path, n_layer, n_embd,
                    layers, width, role.replace("_", " "))


def qwen3_folder_role(folder: Path) -> str:
    """'compiler' for the trained compiler (its tokenizer adds <prefix_1>..), else 'pseudo_compiler'."""
    tj = folder / "tokenizer.json"
    try:
        added = json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", [])
    except (OSError, ValueError) as exc:
        raise InvalidFileError(f"{tj}: cannot read: {exc}") from exc
    return "compiler" if any(a.get("content") == "<prefix_1>" for a in added) else "pseudo_compiler"


def _gguf_role(path: Path) -> tuple[str, str | None, str | None]:
    """(role, quant name, family when the header alone tells it) of a GGUF."""
    from ..convert.gguf_meta import read_gguf_meta

    meta = read_gguf_meta(path)
    arch = meta.fields.get("general.architecture")
    quant = quant_of_meta(meta)
    if arch == "gpt2":
        return "interpreter", quant, COMPACT.name
    if arch == "qwen3":
        tokens = meta.fields.get("tokenizer.ggml.tokens") or []
        if "<prefix_1>" in tokens:
            return "compiler", quant, None  # the meta.json beside it tells which compiler
        shape = (meta.fields.get("qwen3.block_count"), meta.fields.get("qwen3.embedding_length"))
        if shape == STANDARD_INTERPRETER_SHAPE or path.name == f"{STANDARD.runtime_id}.gguf":
            return "interpreter", quant, STANDARD.name
        return "pseudo_compiler", quant, SHARED
    raise IncompatibleModelError(f"{path}: architecture {arch!r} is neither a PAW interpreter (GPT-2, Qwen3-0.6B) nor a Qwen3 compiler")


def _is_qwen3_folder(p: Path) -> bool:
    try:
        return p.is_dir() and json.loads((p / "config.json").read_text(encoding="utf-8")).get("model_type") == "qwen3"
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class ImportOptions:
    quant: str = "q4_k_m"  # pseudo compiler
    compiler_quant: str = "q8_0"
    roles: tuple[str, ...] = ROLES
    # the program families whose files to take (the shared pseudo compiler goes with any);
    # None: an import takes whatever the folder holds, a pull Compact programs' files
    families: tuple[str, ...] | None = None


@dataclass(frozen=True)
class _Source:
    role: str
    path: Path
    family: str  # compact, standard, or SHARED
    quant: str | None = None  # a GGUF's, from its header

    @property
    def what(self) -> str:
        return self.role.replace("_", " ") + ("" if self.family == SHARED else f" of {self.family} programs")


def _download_roots(src: Path) -> list[Path]:
    """src, and its subfolders that are not a model themselves: the published repos copied in side by
    side (`by-hand/paw-4b-gpt2/compiler/...`) are found as well as their files copied into src."""
    return [src, *(p for p in sorted(src.iterdir()) if p.is_dir() and not p.name.startswith(".") and not _is_qwen3_folder(p))]


def _meta_family(path: Path) -> str:
    """The family a compiler meta.json names (`interpreter_model`; none named: Compact, as early metas)."""
    from ..compiler.config import CompilerMeta

    named = CompilerMeta.load(path).family()
    return (named or COMPACT).name


def find_sources(src: Path, manifest: list[ManifestEntry], family_hint: str | None = None) -> list[_Source]:
    """What `src` holds for each role of each family, from headers and names only (nothing converted
    yet). A compiler or mapper belongs to the family of the meta.json in its folder; with none there,
    to `family_hint` (the one family asked for), else Compact."""
    found: list[_Source] = []
    meta_names = {"meta.json", *(e.file_name() for e in manifest if e.role == "compiler_meta")}
    candidates = [src] if _is_qwen3_folder(src) else []
    for root in _download_roots(src):
        candidates += sorted(root.iterdir())
    root_family: dict[Path, str] = {}
    for p in candidates:
        if p.is_file() and p.name in meta_names:
            family = _meta_family(p)
            if root_family.setdefault(p.parent, family) != family:
                raise PawError(f"{p.parent}: meta.json files of both families ({', '.join(sorted(meta_names & {q.name for q in p.parent.iterdir()}))}); "
                               f"keep each compiler's download in a folder of its own")
            found.append(_Source("compiler_meta", p, family))

    def family_of(p: Path) -> str:
        if p.parent in root_family:
            return root_family[p.parent]
        if family_hint is None:
            log.warning("%s: no compiler meta.json beside it; imported as the %s compiler's (%s). For the other, "
                        "keep its meta.json beside it or pass --family", p, COMPACT.name, COMPACT.compiler)
        return family_hint or COMPACT.name

    for p in candidates:
        if p.is_file() and p.suffix == ".gguf":
            try:
                role, quant, family = _gguf_role(p)
            except IncompatibleModelError as exc:  # another model kept beside the downloads: not ours to refuse
                log.warning("%s; skipped", exc)
                continue
            found.append(_Source(role, p, family or family_of(p), quant))
        elif _is_qwen3_folder(p):
            role = qwen3_folder_role(p)
            found.append(_Source(role, p, family_of(p) if role == "compiler" else SHARED))
        elif p.is_file() and p.name == "lora_mapper.pt":
            found.append(_Source("mapper", p, family_of(p)))
    return found


def import_dir(src: str | os.PathLike[str], directory: Path, options: ImportOptions = ImportOptions(),
               on_tensor: Callable[[str], None] | None = None,
               on_step: Callable[[str, int | None], None] | None = None) -> list[dict[str, Any]]:
    """Bring files from `src` (downloads copied by hand, or a hub snapshot) into the models directory:
    published GGUFs are verified and copied, HF folders and lora_mapper.pt are converted. Everything
    cheap to check (headers, meta.json, the interpreter's hash, installed.json) is checked before
    the first conversion, which takes minutes on the real models.

    Progress: `on_step(what, n_tensors or None)` as each conversion pass starts (writing a file,
    llama.cpp's quantize pass), then `on_tensor(name)` per tensor of that pass."""
    from ..convert.mapper import convert_mapper
    from ..convert.qwen3 import Qwen3Source, convert_qwen3, preflight

    src = Path(src).expanduser().absolute()  # recorded in installed.json: not relative to today's folder
    if not src.is_dir():
        raise ModelNotFoundError(f"{src}: not a folder; pass the folder holding the downloaded model files")
    manifest = load_manifest()
    families = options.families or tuple(FAMILIES)
    found = find_sources(src, manifest, families[0] if len(families) == 1 else None)
    sources: dict[tuple[str, str], _Source] = {}  # (family, role) -> source
    for f in found:
        if f.role not in options.roles or (f.family != SHARED and f.family not in families):
            continue
        if (f.family, f.role) in sources:  # which one was meant cannot be guessed
            raise PawError(f"{src}: two candidates for the {f.what} ({sources[f.family, f.role].path}, {f.path}); "
                           f"keep one, or import each from a folder of its own")
        sources[f.family, f.role] = f
    if not sources:
        raise ModelNotFoundError(
            f"{src}: nothing to import. Expected any of: gpt2-q8_0.gguf; qwen3-0.6b-q6_k.gguf; a Qwen3 GGUF; the "
            "paw-4b-gpt2 or paw-4b-qwen3-0.6b download (compiler/ folder, lora_mapper.pt, meta.json); a "
            "Qwen3-4B-Instruct-2507 HF folder")
    read_installed(directory)  # a broken record fails now, not after the conversions
    n_tensors: dict[tuple[str, str], int] = {}
    for (family, role), f in sources.items():
        check_family = family if family != SHARED else COMPACT.name
        if f.path.suffix == ".gguf":
            info = check_file(f.path, role, directory, check_family)
            if role in ("compiler", "pseudo_compiler"):
                _warn_unless_published_shape(f.path, role, info["n_layer"], info["n_embd"])
            entry = manifest_entry(check_family, role, manifest)
            if "{quant}" in entry.name and f.quant is None:
                raise InvalidFileError(f"{f.path}: cannot tell its quantization (no general.file_type, and its matrices are "
                                       f"of no single known type); convert the HF folder with `paw-lite convert qwen3` instead")
            if entry.sha256 and file_sha256(f.path) != entry.sha256:
                raise IncompatibleModelError(f"{f.path}: not the published {entry.name} (sha256 differs from the manifest); "
                                             "use your own interpreter with --base-model PATH instead")
        elif role == "compiler_meta":
            check_file(f.path, role, directory, check_family)
        elif role in ("compiler", "pseudo_compiler"):
            source = Qwen3Source(f.path)  # config and shard headers
            preflight(source, options.compiler_quant if role == "compiler" else options.quant)  # tokenizer, llama.cpp
            n_tensors[family, role] = len(source.tensors)
            _warn_unless_published_shape(f.path, role, source.config.n_layer, source.config.n_embd)

    done: list[dict[str, Any]] = []
    with created_folder(directory):  # a failed import does not leave an empty models folder behind
        # Models first: the mapper is checked against the compiler's width and the interpreter's modules.
        for (family, role), f in sorted(sources.items(), key=lambda kv: _IMPORT_ORDER.index(kv[0][1])):
            if role not in ("interpreter", "compiler", "pseudo_compiler"):
                continue
            entry = manifest_entry(family if family != SHARED else COMPACT.name, role, manifest)
            if f.path.suffix == ".gguf":
                name = entry.file_name(f.quant if "{quant}" in entry.name else None)
                with atomic_path(directory / name) as tmp:
                    shutil.copyfile(f.path, tmp)
                done.append(record_installed(directory, name, role, str(f.path), "copied", family))
            else:
                quant = options.compiler_quant if role == "compiler" else options.quant
                name = entry.file_name(quant)
                if on_step is not None:
                    on_step(f"{name}: converting", n_tensors[family, role])

                def on_pass(count: int, name: str = name) -> None:
                    if on_step is not None:
                        on_step(f"{name}: llama.cpp quantize", count)

                convert_qwen3(f.path, directory / name, quant, on_tensor, on_pass)
                checked_or_removed(directory / name, lambda: check_file(directory / name, role, directory,
                                                                        family if family != SHARED else COMPACT.name))
                done.append(record_installed(directory, name, role, str(f.path), f"paw-lite convert qwen3 --type {quant}", family))
        for family in FAMILIES:
            meta = sources.get((family, "compiler_meta"))
            if meta is not None:
                name = manifest_entry(family, "compiler_meta", manifest).file_name()
                with atomic_path(directory / name) as tmp:
                    shutil.copyfile(meta.path, tmp)
                done.append(record_installed(directory, name, "compiler_meta", str(meta.path), "copied", family))
            mapper = sources.get((family, "mapper"))
            if mapper is not None:
                name = manifest_entry(family, "mapper", manifest).file_name()
                # the download's meta.json gives the mapper's rank and bases, imported or not
                meta_path = next((f.path for f in found if f.role == "compiler_meta" and f.family == family), None)
                if on_step is not None:
                    on_step(f"{name}: converting", None)
                try:
                    shape = installed_mapper_shape(directory, meta_path, family)
                except ShapeSourceError as exc:  # outside a verify row: that file's own error, with its own type
                    raise exc.__cause__ from None
                convert_mapper(mapper.path, directory / name, shape, on_tensor)
                done.append(record_installed(directory, name, "mapper", str(mapper.path), "paw-lite convert mapper", family))
    return done


_IMPORT_ORDER = ("interpreter", "compiler", "pseudo_compiler", "compiler_meta", "mapper")
