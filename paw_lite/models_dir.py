"""The models directory: what should be there (models/manifest.json), what is there, whether it is
intact, and how files get there (`pull` from the hub, `import` from a folder brought in by hand).

Files used as published are pinned by size and sha256 in the manifest. Files paw_lite converts are
checked structurally (verify_gguf, the mapper's key/shape check) and against the sha256 recorded in
`installed.json` when they were written, so later corruption is caught too."""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from . import paths
from .atomic import atomic_path, checked_or_removed, created_folder
from .base_model import file_sha256
from .errors import IncompatibleModelError, InvalidFileError, ModelNotFoundError, PawError, malformed_file, require

log = logging.getLogger(__name__)

# models/ is installed as the package paw_lite.models (pyproject package-dir), so this works from an
# installed wheel as well as from the source tree.
MANIFEST_PATH = Path(str(importlib.resources.files("paw_lite.models").joinpath("manifest.json")))
INSTALLED = "installed.json"
ROLES = ("interpreter", "compiler", "mapper", "compiler_meta", "pseudo_compiler")
QUANT_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")


@dataclass(frozen=True)
class ManifestEntry:
    name: str  # may hold {quant}
    role: str
    serves: tuple[str, ...]
    source: dict[str, Any]
    bytes: int | None = None
    sha256: str | None = None
    default_quant: str | None = None

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


def load_manifest(path: Path | None = None) -> dict[str, ManifestEntry]:
    """role -> entry."""
    path = path or MANIFEST_PATH
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [ManifestEntry(name=e["name"], role=e["role"], serves=tuple(e["serves"]), source=e["source"],
                                 bytes=e.get("bytes"), sha256=e.get("sha256"), default_quant=e.get("default_quant"))
                   for e in data["files"]]
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"{path}: the models manifest is missing (reinstall paw-lite from its source tree)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidFileError(f"{path}: malformed models manifest: {exc}") from exc
    return {e.role: e for e in entries}


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


def _record(directory: Path, name: str, role: str, source: str, how: str) -> dict[str, Any]:
    path = directory / name
    info = {"role": role, "bytes": path.stat().st_size, "sha256": file_sha256(path), "source": source, "how": how}
    records = read_installed(directory)
    records[name] = info
    with atomic_path(directory / INSTALLED) as tmp:
        tmp.write_text(json.dumps(records, indent=2, sort_keys=True), encoding="utf-8")
    return {"name": name, **info}


# --- checking -------------------------------------------------------------------------------------

class ShapeSourceError(PawError):
    """A file the mapper's expected shape is read from (the compiler meta.json, the compiler or the
    interpreter GGUF) is unreadable. The message is that file's own error; `source` names the file, so
    a check of the mapper can point at it instead of reporting its error as the mapper's."""

    def __init__(self, source: Path, cause: Exception):
        super().__init__(str(cause))
        self.source = source


def _read_shape_source(path: Path, what: str, read: Callable[[Path], Any]) -> Any:
    try:
        with malformed_file(path, what):
            return read(path)
    except PawError as exc:
        raise ShapeSourceError(path, exc) from exc


# A --models path that is a file: what `models list|verify` and `doctor` say, and the fix.
NOT_A_FOLDER = "the models directory is a file, not a folder"
NOT_A_FOLDER_FIX = "point --models or PAW_LITE_MODELS at a folder"


# Both compilers are Qwen3-4B-Instruct-2507 (the trained one fine-tuned from it): (layers, width).
PUBLISHED_QWEN3_SHAPE = (36, 2560)


def _warn_unless_published_shape(path: Path, role: str, n_layer: int, n_embd: int) -> None:
    """Another Qwen3 imports and runs, but is not the model the reference system compiles with."""
    if (n_layer, n_embd) != PUBLISHED_QWEN3_SHAPE:
        layers, width = PUBLISHED_QWEN3_SHAPE
        log.warning("%s: a %d-layer, %d-wide Qwen3, not the published Qwen3-4B (%d layers, %d wide); imported as the %s, "
                    "but programs compiled with it will differ from the reference system's", path, n_layer, n_embd,
                    layers, width, role.replace("_", " "))


def check_file(path: Path, role: str, directory: Path) -> dict[str, Any]:
    """Structural check of one file for its role; raises with the problem."""
    if role in ("interpreter", "compiler", "pseudo_compiler"):
        from .convert.verify import verify_gguf

        return verify_gguf(path, role)
    if role == "compiler_meta":
        from .compiler.config import CompilerMeta

        meta = CompilerMeta.load(path)
        return {"lora_rank": meta.lora_rank, "lora_num_bases": meta.lora_num_bases, "prefix_steps": meta.prefix_steps}
    if role == "mapper":
        from .compiler.mapper import Mapper
        from .safetensors_file import SafetensorsFile

        SafetensorsFile(path)  # the mapper's own header first: its problem must not wait for the other files'
        try:
            shape = installed_mapper_shape(directory)
        except ShapeSourceError as exc:  # that file's own check reports the problem; here it is only the cause
            raise InvalidFileError(f"{path}: cannot check its shape: {exc.source.name} is unreadable (see its row); "
                                   f"fix that file first") from exc
        Mapper.check(path, shape)
        return {"hidden": shape.hidden, "rank": shape.rank, "n_bases": shape.n_bases, "interpreter_layers": shape.interpreter.n_layer}
    raise ValueError(f"unknown role {role!r}")


def installed_mapper_shape(directory: Path, meta_path: Path | None = None):
    """The mapper shape the files in `directory` call for: rank and bases from the compiler meta, the
    hidden width from the compiler GGUF, the module widths from the interpreter; the published
    figures (PAW-FACTS §1) for whichever is not there yet."""
    from .compiler.config import CompilerMeta
    from .convert.gguf_meta import read_gguf_meta
    from .convert.mapper import QWEN3_4B_HIDDEN, mapper_shape
    from .convert.verify import gpt2_config

    manifest = load_manifest()
    meta_path = meta_path or directory / manifest["compiler_meta"].file_name()
    meta = _read_shape_source(meta_path, "compiler meta.json", CompilerMeta.load) if meta_path.exists() else None
    compilers = _present(directory, manifest["compiler"])
    hidden = _read_shape_source(compilers[0], "compiler file", lambda p: int(read_gguf_meta(p).fields.get(
        "qwen3.embedding_length", QWEN3_4B_HIDDEN))) if compilers else QWEN3_4B_HIDDEN
    interp_path = directory / manifest["interpreter"].file_name()
    interpreter = _read_shape_source(interp_path, "interpreter file", lambda p: gpt2_config(read_gguf_meta(p), p)) \
        if interp_path.exists() else None
    return mapper_shape(meta, interpreter, hidden)


@dataclass
class FileStatus:
    role: str
    name: str
    serves: tuple[str, ...]
    status: str  # ok | missing | bad | present (listed, not verified)
    bytes: int | None = None
    sha256: str | None = None
    detail: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def _present(directory: Path, entry: ManifestEntry) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and entry.matches(p.name))


def survey(directory: Path, *, verify: bool) -> list[FileStatus]:
    """Every manifest role with the files present for it; with verify, hashes and structural checks."""
    manifest = load_manifest()
    records = read_installed(directory) if verify else {}  # listing needs no records
    out = []
    for role, entry in manifest.items():
        files = _present(directory, entry)
        if not files:
            how = entry.source["how"].format(quant=entry.default_quant, output=directory / entry.file_name())
            out.append(FileStatus(role, entry.file_name(), entry.serves, "missing",
                                  detail=f"from {entry.source['repo']} ({how}; `paw-lite models import DIR` does this)"))
            continue
        for path in files:
            st = FileStatus(role, path.name, entry.serves, "present", bytes=path.stat().st_size)
            if verify:
                _verify_one(st, path, entry, records.get(path.name), directory)
            out.append(st)
    return out


def _verify_one(st: FileStatus, path: Path, entry: ManifestEntry, record: dict | None, directory: Path) -> None:
    st.sha256 = file_sha256(path)
    if entry.sha256 and (st.sha256 != entry.sha256 or st.bytes != entry.bytes):
        st.status, st.detail = "bad", (f"sha256 {st.sha256[:12]}…/{st.bytes:,} bytes, expected the published "
                                       f"{entry.sha256[:12]}…/{entry.bytes:,}: re-download with `paw-lite models pull`")
        return
    if record and record.get("sha256") != st.sha256:
        st.status, st.detail = "bad", "changed since paw-lite wrote it (sha256 differs from installed.json): pull or import again"
        return
    try:
        with malformed_file(path, entry.role.replace("_", " ") + " file"):
            st.info = check_file(path, entry.role, directory)
            named, held = entry.quant_in(path.name), gguf_quant(path) if path.suffix == ".gguf" else None
    except PawError as exc:
        st.status, st.detail = "bad", str(exc)
        return
    if named and held and named.lower() != held:
        st.status, st.detail = "bad", (f"named {named} but holds {held.upper()} weights (general.file_type and "
                                       f"its tensors): rename it to {entry.file_name(held)}, or import the right file")
        return
    st.status = "ok"
    st.detail = ("published sha256 matches" if entry.sha256 else
                 f"sha256 as when paw-lite {'copied' if record.get('how') == 'copied' else 'converted'} it" if record else
                 "structure checked; no recorded sha256")


# --- import ---------------------------------------------------------------------------------------

def qwen3_folder_role(folder: Path) -> str:
    """'compiler' for the trained compiler (its tokenizer adds <prefix_1>..), else 'pseudo_compiler'."""
    tj = folder / "tokenizer.json"
    try:
        added = json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", [])
    except (OSError, ValueError) as exc:
        raise InvalidFileError(f"{tj}: cannot read: {exc}") from exc
    return "compiler" if any(a.get("content") == "<prefix_1>" for a in added) else "pseudo_compiler"


# The file type a GGUF without general.file_type most likely has, from its most common matrix type.
_MATRIX_QUANT = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "Q6_K": "q6_k", "Q5_K": "q5_k_m", "Q4_K": "q4_k_m"}


def _quant_of(meta) -> str | None:
    from collections import Counter

    from gguf import LlamaFileType

    ftype = meta.fields.get("general.file_type")
    try:
        if ftype is not None:
            return LlamaFileType(ftype).name.lower().replace("mostly_", "").replace("all_", "")
    except ValueError:
        pass
    matrices = Counter(t.qtype.name for t in meta.tensors.values() if len(t.shape) >= 2)
    return _MATRIX_QUANT.get(matrices.most_common(1)[0][0]) if matrices else None


def gguf_quant(path: Path) -> str | None:
    """A GGUF's quantization as the models directory names it (q8_0, q4_k_m, ...): its
    general.file_type, else its most common matrix type; None when neither tells."""
    from .convert.gguf_meta import read_gguf_meta

    return _quant_of(read_gguf_meta(path))


def _gguf_role(path: Path) -> tuple[str, str | None]:
    """(role, quant name) of a GGUF from its header."""
    from .convert.gguf_meta import read_gguf_meta

    meta = read_gguf_meta(path)
    arch = meta.fields.get("general.architecture")
    quant = _quant_of(meta)
    if arch == "gpt2":
        return "interpreter", quant
    if arch == "qwen3":
        tokens = meta.fields.get("tokenizer.ggml.tokens") or []
        return ("compiler" if "<prefix_1>" in tokens else "pseudo_compiler"), quant
    raise IncompatibleModelError(f"{path}: architecture {arch!r} is neither the GPT-2 interpreter nor a Qwen3 compiler")


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


@dataclass(frozen=True)
class _Source:
    role: str
    path: Path
    quant: str | None = None  # a GGUF's, from its header


def _download_roots(src: Path) -> list[Path]:
    """src, and its subfolders that are not a model themselves: the published repos copied in side by
    side (`by-hand/paw-4b-gpt2/compiler/...`) are found as well as their files copied into src."""
    return [src, *(p for p in sorted(src.iterdir()) if p.is_dir() and not p.name.startswith(".") and not _is_qwen3_folder(p))]


def find_sources(src: Path, manifest: dict[str, ManifestEntry]) -> list[_Source]:
    """What `src` holds for each role, from headers and names only (nothing converted yet)."""
    found: list[_Source] = []
    meta_names = ("meta.json", manifest["compiler_meta"].file_name())
    candidates = [src] if _is_qwen3_folder(src) else []
    for root in _download_roots(src):
        candidates += sorted(root.iterdir())
    for p in candidates:
        if p.is_file() and p.suffix == ".gguf":
            try:
                role, quant = _gguf_role(p)
            except IncompatibleModelError as exc:  # another model kept beside the downloads: not ours to refuse
                log.warning("%s; skipped", exc)
                continue
            found.append(_Source(role, p, quant))
        elif _is_qwen3_folder(p):
            found.append(_Source(qwen3_folder_role(p), p))
        elif p.is_file() and p.name in meta_names:
            found.append(_Source("compiler_meta", p))
        elif p.is_file() and p.name == "lora_mapper.pt":
            found.append(_Source("mapper", p))
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
    from .convert.mapper import convert_mapper
    from .convert.qwen3 import Qwen3Source, convert_qwen3, preflight

    src = Path(src).expanduser().absolute()  # recorded in installed.json: not relative to today's folder
    if not src.is_dir():
        raise ModelNotFoundError(f"{src}: not a folder; pass the folder holding the downloaded model files")
    manifest = load_manifest()
    found = find_sources(src, manifest)
    sources: dict[str, _Source] = {}
    for f in found:
        if f.role not in options.roles:
            continue
        if f.role in sources:  # which one was meant cannot be guessed
            raise PawError(f"{src}: two candidates for the {f.role.replace('_', ' ')} ({sources[f.role].path}, {f.path}); "
                           f"keep one, or import each from a folder of its own")
        sources[f.role] = f
    if not sources:
        raise ModelNotFoundError(
            f"{src}: nothing to import. Expected any of: gpt2-q8_0.gguf; a Qwen3 GGUF; the paw-4b-gpt2 download "
            "(compiler/ folder, lora_mapper.pt, meta.json); a Qwen3-4B-Instruct-2507 HF folder")
    read_installed(directory)  # a broken record fails now, not after the conversions
    n_tensors: dict[str, int] = {}
    for role, f in sources.items():
        if f.path.suffix == ".gguf":
            info = check_file(f.path, role, directory)
            if role in ("compiler", "pseudo_compiler"):
                _warn_unless_published_shape(f.path, role, info["n_layer"], info["n_embd"])
            entry = manifest[role]
            if "{quant}" in entry.name and f.quant is None:
                raise InvalidFileError(f"{f.path}: cannot tell its quantization (no general.file_type, and its matrices are "
                                       f"of no single known type); convert the HF folder with `paw-lite convert qwen3` instead")
            if entry.sha256 and file_sha256(f.path) != entry.sha256:
                raise IncompatibleModelError(f"{f.path}: not the published {entry.name} (sha256 differs from the manifest); "
                                             "use your own interpreter with --base-model PATH instead")
        elif role == "compiler_meta":
            check_file(f.path, role, directory)
        elif role in ("compiler", "pseudo_compiler"):
            source = Qwen3Source(f.path)  # config and shard headers
            preflight(source, options.compiler_quant if role == "compiler" else options.quant)  # tokenizer, llama.cpp
            n_tensors[role] = len(source.tensors)
            _warn_unless_published_shape(f.path, role, source.config.n_layer, source.config.n_embd)

    done: list[dict[str, Any]] = []
    with created_folder(directory):  # a failed import does not leave an empty models folder behind
        # Models first: the mapper is checked against the compiler's width and the interpreter's modules.
        for role in ("interpreter", "compiler", "pseudo_compiler"):
            f = sources.get(role)
            if f is None:
                continue
            entry = manifest[role]
            if f.path.suffix == ".gguf":
                name = entry.file_name(f.quant if "{quant}" in entry.name else None)
                with atomic_path(directory / name) as tmp:
                    shutil.copyfile(f.path, tmp)
                done.append(_record(directory, name, role, str(f.path), "copied"))
            else:
                quant = options.compiler_quant if role == "compiler" else options.quant
                name = entry.file_name(quant)
                if on_step is not None:
                    on_step(f"{name}: converting", n_tensors[role])

                def on_pass(count: int, name: str = name) -> None:
                    if on_step is not None:
                        on_step(f"{name}: llama.cpp quantize", count)

                convert_qwen3(f.path, directory / name, quant, on_tensor, on_pass)
                checked_or_removed(directory / name, lambda: check_file(directory / name, role, directory))
                done.append(_record(directory, name, role, str(f.path), f"paw-lite convert qwen3 --type {quant}"))
        meta = sources.get("compiler_meta")
        if meta is not None:
            name = manifest["compiler_meta"].file_name()
            with atomic_path(directory / name) as tmp:
                shutil.copyfile(meta.path, tmp)
            done.append(_record(directory, name, "compiler_meta", str(meta.path), "copied"))
        mapper = sources.get("mapper")
        if mapper is not None:
            name = manifest["mapper"].file_name()
            # the download's meta.json gives the mapper's rank and bases, imported or not
            meta_path = next((f.path for f in found if f.role == "compiler_meta"), None)
            if on_step is not None:
                on_step(f"{name}: converting", None)
            try:
                shape = installed_mapper_shape(directory, meta_path)
            except ShapeSourceError as exc:  # outside a verify row: that file's own error, with its own type
                raise exc.__cause__ from None
            convert_mapper(mapper.path, directory / name, shape, on_tensor)
            done.append(_record(directory, name, "mapper", str(mapper.path), "paw-lite convert mapper"))
    return done


# --- pull -----------------------------------------------------------------------------------------

_OFFLINE_HINT = (
    "Without a network: on a machine with one, download programasweights/GPT2-GGUF-Q8_0 (gpt2-q8_0.gguf), "
    "programasweights/paw-4b-gpt2 (compiler/, lora_mapper.pt, meta.json) and Qwen/Qwen3-4B-Instruct-2507 "
    "(or a GGUF of it), copy them into one folder here and run `paw-lite models import DIR`")


def _check_online(hub: Any, timeout: float = 5.0) -> None:
    """Fail in seconds, not after minutes of retries, when the hub cannot be reached."""
    if getattr(hub.constants, "HF_HUB_OFFLINE", False):
        raise ModelNotFoundError(f"HF_HUB_OFFLINE is set: `paw-lite models pull` needs the hub. {_OFFLINE_HINT}")
    url = urlparse(hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as exc:
        raise ModelNotFoundError(f"cannot reach {hub.constants.ENDPOINT} ({exc.strerror or exc}). {_OFFLINE_HINT}") from exc


def pull(directory: Path, options: ImportOptions = ImportOptions(), *, hub: Any = None,
         on_tensor: Callable[[str], None] | None = None,
         on_step: Callable[[str, int | None], None] | None = None) -> list[dict[str, Any]]:
    """Download the published repos (resumable: the hub cache lives in `<models>/.hub-cache`) and import them.
    `hub` is the huggingface_hub module (tests pass a stand-in)."""
    if hub is None:
        hub = require("huggingface_hub", "pull")
        require("huggingface_hub.constants", "pull")  # a lazy submodule: import it so hub.constants exists
    manifest = load_manifest()
    _check_online(hub)
    cache = directory / ".hub-cache"
    by_repo: dict[str, list[str]] = {}
    for role in options.roles:
        src = manifest[role].source
        by_repo.setdefault(src["repo"], []).extend(src["files"])
    done: list[dict[str, Any]] = []
    for repo, patterns in by_repo.items():
        try:
            snap = Path(hub.snapshot_download(repo, allow_patterns=sorted(set(patterns)), cache_dir=str(cache)))
        except Exception as exc:  # the hub raises many types (HTTP, connection, auth): report one line
            raise ModelNotFoundError(f"{repo}: download failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                                     f"{_OFFLINE_HINT}") from exc
        roles = tuple(r for r in options.roles if manifest[r].source["repo"] == repo)
        done += import_dir(snap, directory, ImportOptions(options.quant, options.compiler_quant, roles), on_tensor, on_step)
    return done


def models_directory(override: str | os.PathLike[str] | None = None) -> Path:
    return Path(override).expanduser() if override else paths.models_dir()


def summarize(statuses: Iterable[FileStatus]) -> list[dict[str, Any]]:
    return [{"role": s.role, "name": s.name, "serves": list(s.serves), "status": s.status, "bytes": s.bytes,
             "sha256": s.sha256, "detail": s.detail, **({"info": s.info} if s.info else {})} for s in statuses]
