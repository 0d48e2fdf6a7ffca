"""paw_lite: Program-as-Weights on a CPU, offline, in plain Python."""

from .base_model import BaseModel
from .compiler import compile, compile_and_load
from .constraints import ConstraintError, IncompleteOutputError
from .errors import (
    ContextOverflowError,
    IncompatibleModelError,
    InvalidFileError,
    InvalidInputError,
    MissingDependencyError,
    ModelNotFoundError,
    PawError,
)
from .evaluate import EvaluationInterrupted, EvaluationReport, evaluate
from .program import Program
from .runtime import PawFunction, function

__version__ = "0.1.0"

__all__ = [
    "BaseModel",
    "ConstraintError",
    "ContextOverflowError",
    "IncompatibleModelError",
    "IncompleteOutputError",
    "InvalidFileError",
    "InvalidInputError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "compile",
    "compile_and_load",
    "EvaluationInterrupted",
    "EvaluationReport",
    "evaluate",
    "PawError",
    "PawFunction",
    "Program",
    "function",
]
