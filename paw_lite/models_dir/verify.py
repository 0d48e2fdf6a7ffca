"""Whether the files in the models directory are intact: the published sha256, the one recorded in
installed.json, and each role's structural check (`models list|verify`, `doctor`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base_model import file_sha256
from ..errors import IncompatibleModelError, InvalidFileError, PawError, malformed_file
from ..families import COMPACT, FAMILIES
from .manifest import SHARED, ManifestEntry, load_manifest, manifest_entry, read_installed


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


def check_file(path: Path, role: str, directory: Path, family: str = COMPACT.name) -> dict[str, Any]:
    """Structural check of one file for its role in `family`'s programs; raises with the problem."""
    if role in ("interpreter", "compiler", "pseudo_compiler"):
        from ..convert.verify import verify_gguf

        return verify_gguf(path, role, interpreter_arch=FAMILIES[family].arch if family in FAMILIES else None)
    if role == "compiler_meta":
        from ..compiler.config import CompilerMeta

        meta = CompilerMeta.load(path)
        named = meta.family()
        if named is not None and named.name != family:
            raise IncompatibleModelError(f"{path}: the meta.json of a {named.name} compiler ({named.compiler}; interpreter_model "
                                         f"{meta.interpreter_model!r}) in the place of the {family} one ({FAMILIES[family].compiler})")
        return {"lora_rank": meta.lora_rank, "lora_num_bases": meta.lora_num_bases, "prefix_steps": meta.prefix_steps,
                "interpreter_model": meta.interpreter_model}
    if role == "mapper":
        from ..compiler.mapper import Mapper
        from ..safetensors_file import SafetensorsFile

        SafetensorsFile(path)  # the mapper's own header first: its problem must not wait for the other files'
        try:
            shape = installed_mapper_shape(directory, family=family)
        except ShapeSourceError as exc:  # that file's own check reports the problem; here it is only the cause
            raise InvalidFileError(f"{path}: cannot check its shape: {exc.source.name} is unreadable (see its row); "
                                   f"fix that file first") from exc
        Mapper.check(path, shape)
        return {"hidden": shape.hidden, "rank": shape.rank, "n_bases": shape.n_bases, "interpreter_layers": shape.interpreter.n_layer,
                "modules": len(shape.modules)}
    raise ValueError(f"unknown role {role!r}")


def installed_mapper_shape(directory: Path, meta_path: Path | None = None, family: str = COMPACT.name):
    """The mapper shape `family`'s files in `directory` call for: rank and bases from the compiler
    meta, the hidden width from the compiler GGUF, the layers and module widths from the interpreter;
    the published figures (the model cards of programasweights/paw-4b-gpt2 and paw-4b-qwen3-0.6b,
    and the official SDK) for whichever is not there yet."""
    from ..compiler.config import CompilerMeta
    from ..compiler.interpreter import read_interpreter
    from ..convert.gguf_meta import read_gguf_meta
    from ..convert.mapper import QWEN3_4B_HIDDEN, mapper_shape

    manifest = load_manifest()
    meta_path = meta_path or directory / manifest_entry(family, "compiler_meta", manifest).file_name()
    meta = _read_shape_source(meta_path, "compiler meta.json", CompilerMeta.load) if meta_path.exists() else None
    compilers = _present(directory, manifest_entry(family, "compiler", manifest))
    hidden = _read_shape_source(compilers[0], "compiler file", lambda p: int(read_gguf_meta(p).fields.get(
        "qwen3.embedding_length", QWEN3_4B_HIDDEN))) if compilers else QWEN3_4B_HIDDEN
    interp_path = directory / manifest_entry(family, "interpreter", manifest).file_name()
    interpreter = _read_shape_source(interp_path, "interpreter file",
                                     lambda p: read_interpreter(p, FAMILIES[family]).config) if interp_path.exists() else None
    return mapper_shape(meta, interpreter, hidden, FAMILIES[family])


@dataclass
class FileStatus:
    role: str
    family: str  # compact, standard, or both (manifest.SHARED)
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
    """Every manifest file (both families) with the files present for it; with verify, hashes and
    structural checks."""
    manifest = load_manifest()
    records = read_installed(directory) if verify else {}  # listing needs no records
    out = []
    for entry in manifest:
        role = entry.role
        files = _present(directory, entry)
        if not files:
            how = entry.source["how"].format(quant=entry.default_quant, output=directory / entry.file_name())
            out.append(FileStatus(role, entry.family, entry.file_name(), entry.serves, "missing",
                                  detail=f"from {entry.source['repo']} ({how}; `paw-lite models import DIR` does this)"))
            continue
        for path in files:
            st = FileStatus(role, entry.family, path.name, entry.serves, "present", bytes=path.stat().st_size)
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
            st.info = check_file(path, entry.role, directory, entry.family if entry.family != SHARED else COMPACT.name)
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


# The file type a GGUF without general.file_type most likely has, from its most common matrix type.
_MATRIX_QUANT = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "Q6_K": "q6_k", "Q5_K": "q5_k_m", "Q4_K": "q4_k_m"}


def quant_of_meta(meta) -> str | None:
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
    from ..convert.gguf_meta import read_gguf_meta

    return quant_of_meta(read_gguf_meta(path))


def summarize(statuses: Iterable[FileStatus]) -> list[dict[str, Any]]:
    return [{"role": s.role, "family": s.family, "name": s.name, "serves": list(s.serves), "status": s.status, "bytes": s.bytes,
             "sha256": s.sha256, "detail": s.detail, **({"info": s.info} if s.info else {})} for s in statuses]
