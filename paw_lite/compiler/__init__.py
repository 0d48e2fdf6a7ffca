"""The CPU compiler: spec -> `.paw` program with llama.cpp (pseudo compiler, trained compiler as an
encoder) and a NumPy mapper. Needs the `compile` extra (llama-cpp-python, jinja2), imported lazily."""

from .config import DEFAULT_FILES, CompilerMeta, ModelFiles
from .pipeline import CompileOptions, CompileResult, compile, compile_and_load, compile_program, compile_report

__all__ = ["CompileOptions", "CompileResult", "CompilerMeta", "DEFAULT_FILES", "ModelFiles", "compile",
           "compile_and_load", "compile_program", "compile_report"]
