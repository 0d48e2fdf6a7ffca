"""The errors paw_lite raises. Every message names the file, the value and what was expected."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator


class PawError(Exception):
    """Base class of every error paw_lite raises on purpose."""


class InvalidFileError(PawError):
    """A file (bundle, GGUF, safetensors, checkpoint) is malformed or unsafe."""


class IncompatibleModelError(PawError):
    """A program, adapter or model does not fit the model it is used with."""


class ModelNotFoundError(PawError):
    """A model file paw_lite needs is not present."""


class ContextOverflowError(PawError):
    """The prompt does not fit the interpreter's context window."""


class MissingDependencyError(PawError):
    """An optional dependency is not installed."""


def require(module: str, extra: str):
    """Import an optional dependency or raise one clear install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f"pip install 'paw-lite[{extra}]'"
        if module == "llama_cpp":
            hint = f'CMAKE_ARGS="-DGGML_NATIVE=OFF" {hint}'
        raise MissingDependencyError(f"{module} is needed for this command and is not installed: {hint}") from exc


def regular_file_size(path: str | os.PathLike[str]) -> int:
    """The size of a file about to be read as untrusted input. A FIFO or device is refused: reading
    it would block or never end. OSError (no such file, permissions) is left to the caller."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidFileError(f"{path}: not a regular file")
    return st.st_size


# What parsing code raises when a file's values have the wrong types or shapes: a list where a
# number goes, an unhashable key, a JSON array where an object goes, nesting too deep.
_MALFORMED = (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError, OverflowError)


@contextlib.contextmanager
def malformed_file(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Around reading an untrusted file: an error its parser did not foresee becomes one
    InvalidFileError naming the file, not a traceback from deep inside. The readers check what
    they know to check; this is the net under them (-v logs where it came from)."""
    try:
        yield
    except PawError:
        raise
    except _MALFORMED as exc:
        logging.getLogger("paw_lite").info("reading %s failed", path, exc_info=True)
        raise InvalidFileError(f"{path}: not a valid {what} ({type(exc).__name__}: {str(exc)[:200]}); "
                               f"if the file is intact, this is a paw-lite bug (-v shows where)") from exc
