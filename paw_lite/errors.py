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


class InvalidInputError(PawError, ValueError):
    """A value handed to the Python API is out of range: a token id outside the vocabulary, an
    empty token list. Also a ValueError, the error Python code expects for a bad argument."""


class MissingDependencyError(PawError):
    """An optional dependency is not installed."""


# The compile extra brings llama-cpp-python, which pip builds from source. GGML_NATIVE=OFF: the default
# -march=native build crashes on Q8_0 models on CPUs with AMX. --no-cache-dir: pip would otherwise
# reuse a wheel it built natively before, possibly on another CPU. (README.md, "Set up".)
_LLAMA_BUILD = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir'
COMPILE_INSTALL = f"{_LLAMA_BUILD} 'paw-lite[compile]'"
# For a llama-cpp-python that is installed but broken on this CPU (a native build): rebuild it alone.
LLAMA_REINSTALL = f"{_LLAMA_BUILD} --force-reinstall llama-cpp-python==0.3.36"


def install_hint(extra: str) -> str:
    """The command that installs an optional extra of paw-lite."""
    return COMPILE_INSTALL if extra == "compile" else f"pip install 'paw-lite[{extra}]'"


def require(module: str, extra: str):
    """Import an optional dependency or raise one clear install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{module} is needed for this command and is not installed: "
                                     f"{install_hint(extra)}") from exc


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
