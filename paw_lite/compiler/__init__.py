"""The CPU compiler: spec -> `.paw` program with llama.cpp (pseudo compiler, trained compiler as an
encoder) and a NumPy mapper, for Compact (GPT-2) or Standard (Qwen3-0.6B) programs. Needs the
`compile` extra (llama-cpp-python, jinja2), imported lazily."""

from .config import DEFAULT_FILES, CompilerMeta, ModelFiles, default_files
from .pipeline import CompileOptions, CompileResult, compile, compile_and_load, compile_program, compile_report

__all__ = ["CompileOptions", "CompileResult", "CompilerMeta", "DEFAULT_FILES", "ModelFiles", "compile",
           "compile_and_load", "compile_program", "compile_report", "default_files"]
