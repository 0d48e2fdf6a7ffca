"""paw_lite: Program-as-Weights on a CPU, offline, in plain Python."""

from .base_model import BaseModel
from .errors import (
    ContextOverflowError,
    IncompatibleModelError,
    InvalidFileError,
    MissingDependencyError,
    ModelNotFoundError,
    PawError,
)
from .program import Program
from .runtime import PawFunction, function

__version__ = "0.1.0"

__all__ = [
    "BaseModel",
    "ContextOverflowError",
    "IncompatibleModelError",
    "InvalidFileError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "PawError",
    "PawFunction",
    "Program",
    "function",
]
