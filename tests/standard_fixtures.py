"""Shared pieces of the Standard-program tests: a Standard .paw bundle as the official compiler
writes one, on any adapter tensors (tests/test_standard_programs.py, tests/test_serve_standard.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from paw_lite.families import STANDARD, standard_template
from paw_lite.lora import adapter_gguf_bytes
from paw_lite.program import PLACEHOLDER, Program

PSEUDO = ("Task: classify the sentiment of a product review as POSITIVE or NEGATIVE.\n\n"
          "Examples:\nInput: works great, five stars\nOutput: POSITIVE\nInput: broke after a day\nOutput: NEGATIVE")


def make_standard_program(path: Path, tensors: dict[str, np.ndarray], alpha: float = 16.0, tensor_type: str = "q4_0",
                          pseudo: str = PSEUDO, runtime_id: str = STANDARD.runtime_id) -> Path:
    """A Standard .paw bundle as the official compiler writes one: meta.json with the Standard
    interpreter and runtime, prefix_steps null, and the Standard template."""
    rank = next(iter(tensors.values())).shape[0]
    meta = {"version": 4, "program_id": "1" * 20, "spec": "classify review sentiment", "interpreter": STANDARD.interpreter,
            "runtime_id": runtime_id, "prefix_steps": None, "lora_rank": rank, "lora_alpha": alpha,
            "pseudo_program_strategy": "provided"}
    return Program(meta=meta, template=standard_template(pseudo, PLACEHOLDER),
                   adapter_gguf=adapter_gguf_bytes(tensors, alpha, tensor_type, arch=STANDARD.arch),
                   pseudo_program=pseudo).save(path)
