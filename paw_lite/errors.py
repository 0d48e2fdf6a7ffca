"""The errors paw_lite raises. Every message names the file, the value and what was expected."""

from __future__ import annotations


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
