"""The compiler's inputs: its `meta.json` and where the model files are (the model cards of
programasweights/paw-4b-gpt2 and paw-4b-qwen3-0.6b, and the official SDK), for each program family."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import IncompatibleModelError, InvalidFileError, ModelNotFoundError
from ..families import COMPACT, FAMILIES, STANDARD, Family

log = logging.getLogger("paw_lite.compiler")

MAX_META_BYTES = 1024 * 1024

# File names in the models directory, as `paw-lite models pull` writes them (models/manifest.json),
# per program family: {quant} is the default type, or any other one present when the default is not.
# The pseudo compiler (the stock Qwen3-4B-Instruct-2507) serves both families.
PSEUDO_COMPILER_FILE = ("qwen3-4b-instruct-2507-{quant}.gguf", "q4_k_m")


def _family_file_names(family: Family) -> dict[str, tuple[str, str | None]]:
    return {
        "compiler": (f"{family.compiler}-compiler-{{quant}}.gguf", "q8_0"),
        "mapper": (f"{family.compiler}-mapper.safetensors", None),
        "compiler_meta": (f"{family.compiler}-meta.json", None),
        "pseudo_compiler": PSEUDO_COMPILER_FILE,
        "interpreter": (f"{family.runtime_id}.gguf", None),
    }


FAMILY_FILE_NAMES: dict[str, dict[str, tuple[str, str | None]]] = {name: _family_file_names(f) for name, f in FAMILIES.items()}


def default_files(family: str = COMPACT.name) -> dict[str, str]:
    """role -> the file name a compile of this family looks for in the models directory."""
    return {role: name.format(quant=quant) if quant else name for role, (name, quant) in FAMILY_FILE_NAMES[family].items()}


FILE_NAMES = FAMILY_FILE_NAMES[COMPACT.name]  # Compact programs' (the names earlier releases had alone)
DEFAULT_FILES = default_files(COMPACT.name)

# meta.json `interpreter_model` values naming each family's interpreter (HF ids, any case; runtime ids).
_INTERPRETER_NAMES = {COMPACT.name: {"gpt2", "openai-community/gpt2", COMPACT.runtime_id},
                      STANDARD.name: {STANDARD.interpreter.lower(), STANDARD.runtime_id}}


def _find(directory: Path, role: str, family: str) -> Path:
    """The role's file in the models directory: the default name, else the one other quantization present."""
    name, quant = FAMILY_FILE_NAMES[family][role]
    default = directory / (name.format(quant=quant) if quant else name)
    if default.exists() or not quant:
        return default
    others = sorted(directory.glob(name.replace("{quant}", "*"))) if directory.is_dir() else []
    if len(others) > 1:
        raise ModelNotFoundError(f"{directory}: several {role.replace('_', ' ')} files ({', '.join(p.name for p in others)}) and "
                                 f"not the default {default.name}; name one with --{role.replace('_', '-')}")
    if others:
        log.info("using %s (the default %s is not there)", others[0], default.name)
    return others[0] if others else default


@dataclass(frozen=True)
class CompilerMeta:
    """A compiler's `meta.json` (paw-4b-gpt2's or paw-4b-qwen3-0.6b's): the numbers the mapper and the
    bundle need, and the interpreter the compiler was trained for."""

    lora_rank: int
    lora_alpha: float
    lora_num_bases: int
    prefix_steps: int
    prompt_style: str
    interpreter_model: str | None
    snapshot: str | None
    source: str

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "CompilerMeta":
        path = Path(path)
        try:
            if path.stat().st_size > MAX_META_BYTES:
                raise InvalidFileError(f"{path}: {path.stat().st_size} bytes is too large for a compiler meta.json")
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelNotFoundError(f"{path}: no such compiler meta.json") from exc
        except (OSError, ValueError) as exc:
            raise InvalidFileError(f"{path}: cannot read the compiler meta.json: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidFileError(f"{path}: expected a JSON object")
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "CompilerMeta":
        def number(key: str, kind: type) -> Any:
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (kind is int and value != int(value)):
                raise InvalidFileError(f"{source}: {key} is {value!r}, expected a positive {kind.__name__}")
            return kind(value)

        style = data.get("compiler_prompt_style", "minimal")
        if style != "minimal":
            raise IncompatibleModelError(f"{source}: compiler_prompt_style is {style!r}; paw_lite ships the 'minimal' prompt only")
        snapshot = data.get("compiler_snapshot")
        return cls(lora_rank=number("lora_rank", int), lora_alpha=number("lora_alpha", float),
                   lora_num_bases=number("lora_num_bases", int), prefix_steps=number("prefix_steps", int),
                   prompt_style=style, interpreter_model=data.get("interpreter_model"),
                   snapshot=snapshot if isinstance(snapshot, str) else None, source=source)

    def family(self) -> Family | None:
        """The program family of the interpreter this compiler was trained for (`interpreter_model`);
        None when the meta does not say."""
        if self.interpreter_model is None:
            return None
        for name, known in _INTERPRETER_NAMES.items():
            if str(self.interpreter_model).lower() in known:
                return FAMILIES[name]
        raise IncompatibleModelError(
            f"{self.source}: interpreter_model {self.interpreter_model!r} is neither GPT-2 (Compact programs) nor "
            f"{STANDARD.interpreter} (Standard programs); paw_lite compiles for those two")


@dataclass(frozen=True)
class ModelFiles:
    """The five files a compile reads. Any left as None is looked up in the models directory."""

    compiler: Path | None = None
    mapper: Path | None = None
    compiler_meta: Path | None = None
    pseudo_compiler: Path | None = None
    interpreter: Path | None = None

    def resolved(self, models_dir: str | os.PathLike[str] | None, *, need_pseudo_compiler: bool,
                 family: str = COMPACT.name) -> "ModelFiles":
        """Every needed file as an existing path, those not given taken from the models directory
        under the names of `family`'s files; the error lists all that are missing at once."""
        directory = Path(models_dir).expanduser() if models_dir is not None else paths.models_dir()
        out: dict[str, Path | None] = {}
        missing = []
        for f in fields(self):
            given = getattr(self, f.name)
            if f.name == "pseudo_compiler" and not need_pseudo_compiler and given is None:
                out[f.name] = None
                continue
            path = Path(given).expanduser() if given is not None else _find(directory, f.name, family)
            if not path.exists():
                missing.append(f"{f.name.replace('_', '-')} ({path})")
            out[f.name] = path
        if missing:
            pull = "paw-lite models pull" + ("" if family == COMPACT.name else f" --family {family}")
            raise ModelNotFoundError(
                f"the {family} compiler ({FAMILIES[family].compiler}) needs files that are not there: {'; '.join(missing)}. "
                f"Get them with `{pull}` (or `paw-lite models import DIR`), pass --models DIR (models= in Python) for the folder that "
                f"holds them, or name each one (--compiler, --mapper, --compiler-meta, --pseudo-compiler, --interpreter; "
                f"the same names with underscores in Python)")
        return ModelFiles(**out)
