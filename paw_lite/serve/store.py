"""The programs a server serves: every `*.paw` in the programs folder and in the data folder's
`compiled/` (the PAW API writes there), named after their file stems. A name from a request is
checked against a safe charset before it meets the file system, so no request reaches a path
outside those two folders.

The folders are listed again (stat only, cheap) when a name is not known or a listing is asked
for, so a program copied or compiled into place is served without a restart. Each program is
loaded once, on its first request (a lock per name, so concurrent first requests load it once),
on an interpreter loaded once and shared by every program that runs on it."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..base_model import BaseModel
from ..errors import IncompatibleModelError, ModelNotFoundError, PawError
from ..families import describe
from ..runtime import PawFunction, function
from .settings import ServeSettings

log = logging.getLogger("paw_lite.serve")

# A model name: a file stem without path separators, "..", or characters a shell or URL would mangle.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SUFFIX = ".paw"


class UnknownProgramError(PawError, LookupError):
    """No program has this name (or the name is not a valid one)."""


def is_valid_name(name: object) -> bool:
    """Whether a request's model name can name a program file without leaving its folder."""
    return isinstance(name, str) and bool(_NAME.match(name)) and ".." not in name


@dataclass(frozen=True)
class ProgramFile:
    """A program file as listed: its name (the API's model id), path and stat at listing time."""

    name: str
    path: Path
    mtime_ns: int
    size: int
    compiled: bool  # from data_dir/compiled (made through the server) rather than programs_dir


class ProgramStore:
    """Program files by name, and their loaded functions (`function(name)`)."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self._lock = threading.Lock()  # the listing, the tables below
        self._files: dict[str, ProgramFile] = {}
        self._loaded: dict[str, tuple[ProgramFile, PawFunction]] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._bases: dict[Path, BaseModel] = {}
        self._base_lock = threading.Lock()
        self.refresh()

    # -- listing ------------------------------------------------------------------------------

    def refresh(self) -> dict[str, ProgramFile]:
        """List the folders again. A name in both folders is the programs folder's (the operator's
        file wins over one compiled through the API)."""
        found: dict[str, ProgramFile] = {}
        for folder, compiled in ((self.settings.compiled_dir, True), (self.settings.programs_dir, False)):
            for entry in _list(folder):
                found[entry.stem] = _program_file(entry, compiled) or found.get(entry.stem)
        found = {name: f for name, f in found.items() if f is not None}
        with self._lock:
            self._files = found
        return dict(found)

    def files(self) -> list[ProgramFile]:
        """Every program, sorted by name (listed again first)."""
        return sorted(self.refresh().values(), key=lambda f: f.name)

    def file(self, name: object) -> ProgramFile:
        """The program file of a name, or UnknownProgramError (listing again once when not known)."""
        if not is_valid_name(name):
            raise UnknownProgramError(f"{str(name)[:80]!r} is not a valid model name (letters, digits, '.', '_', '-'; "
                                      f"the file name of a .paw program without .paw)")
        with self._lock:
            found = self._files.get(name)
        if found is None:
            found = self.refresh().get(name)
        if found is None:
            raise UnknownProgramError(f"the model {name!r} does not exist: no {name}{SUFFIX} among the served "
                                      f"programs (GET /v1/models lists them)")
        return found

    # -- loading ------------------------------------------------------------------------------

    def function(self, name: str) -> PawFunction:
        """The loaded program of a name, loaded on first use (a file replaced since is loaded again)."""
        entry = self.file(name)
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is not None and _same_file(loaded[0], entry):
                return loaded[1]
            gate = self._loading.setdefault(name, threading.Lock())
        with gate:  # concurrent first requests: one loads, the others wait for it
            with self._lock:
                loaded = self._loaded.get(name)
            if loaded is not None and _same_file(loaded[0], entry):
                return loaded[1]
            fn = self._load(entry)
            with self._lock:
                self._loaded[name] = (entry, fn)
            return fn

    def unload(self, name: str, fn: PawFunction) -> None:
        """Forget a loaded program (if it is still `fn`): the next request loads it again. Closing
        fn is the caller's, once nothing runs on it."""
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is not None and loaded[1] is fn:
                del self._loaded[name]

    def loaded(self) -> dict[str, PawFunction]:
        with self._lock:
            return {name: fn for name, (_, fn) in self._loaded.items()}

    def _load(self, entry: ProgramFile) -> PawFunction:
        from ..program import Program

        program = Program.load(entry.path)
        base = self._interpreter_of(program, entry)
        log.info("serving %s (%s) from %s on %s", entry.name, program.family.name, entry.path, base.source)
        return function(program, base_model=base, cache_dir=self.settings.cache_dir)

    def _interpreter_of(self, program, entry: ProgramFile) -> BaseModel:
        """The program's family's interpreter: the one the settings give when it is of that family,
        else `<runtime_id>.gguf` in the models directories."""
        given = self.settings.interpreter
        if given is not None:
            base = self._base(paths.resolve_interpreter(given, None))
            if base.family == program.family:
                return base
        rid = program.runtime_id
        if not paths.is_safe_name(rid):
            raise ModelNotFoundError(f"{entry.path.name}: meta.json names runtime {rid!r}, which is not a valid model "
                                     f"file name; give it runtime_id {program.family.runtime_id!r}")
        dirs = self._models_dirs()
        for folder in dirs:
            if (folder / f"{rid}.gguf").is_file():
                return self._base(folder / f"{rid}.gguf")
        where = ", ".join(str(d) for d in dirs)
        if given is not None:
            raise IncompatibleModelError(
                f"{entry.path.name} is {describe(program.family)}, but this server's --base-model {given} is a "
                f"{base.family.model} model, and no {rid}.gguf is in the models directories ({where}); put "
                f"{rid}.gguf there (`paw-lite models pull --family {program.family.name}`, or --models DIR for the "
                f"folder that holds it) to serve both families, or leave out --base-model")
        raise ModelNotFoundError(
            f"{entry.path.name} is {describe(program.family)}: its interpreter {rid}.gguf is not in the models "
            f"directories ({where}); get it with `paw-lite models pull --family {program.family.name}`, pass "
            f"--models DIR for the folder that holds it, or --base-model PATH")

    def _models_dirs(self) -> list[Path]:
        from .runtimes import models_dirs  # the same folders the PAW API's runtimes are found in

        return models_dirs(self.settings.models_dir)

    def _base(self, interpreter: Path) -> BaseModel:
        """One BaseModel per interpreter file, shared by every program on it."""
        key = interpreter.resolve()
        with self._base_lock:
            if key not in self._bases:
                self._bases[key] = BaseModel.load(key)
            return self._bases[key]

    def close(self) -> None:
        with self._lock:
            loaded, self._loaded = self._loaded, {}
        for _, fn in loaded.values():
            fn.close()


def _list(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.suffix == SUFFIX and is_valid_name(p.stem)]
    except FileNotFoundError:
        return []
    except NotADirectoryError as exc:
        raise PawError(f"{folder}: not a folder; the server serves the .paw files in a folder") from exc


def _program_file(path: Path, compiled: bool) -> ProgramFile | None:
    try:
        st = path.stat()  # follows a symlink: a link the operator put there is served
    except OSError:  # gone between listing and stat (a compile's temporary file renamed away)
        return None
    if not path.is_file():
        return None
    return ProgramFile(path.stem, path, st.st_mtime_ns, st.st_size, compiled)


def _same_file(a: ProgramFile, b: ProgramFile) -> bool:
    return (a.path, a.mtime_ns, a.size) == (b.path, b.mtime_ns, b.size)
