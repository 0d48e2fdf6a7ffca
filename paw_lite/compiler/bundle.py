"""Step 4 (the official SDK's importer, programasweights 0.4.14 client.py): LoRA tensors + pseudo-program -> a `Program` with the official members
and meta fields, content-addressed."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from ..families import Family
from ..lora import adapter_gguf_bytes, whole_number
from ..program import Program, content_program_id

META_VERSION = 4
RUNTIME_MANIFEST_VERSION = 1
ADAPTER_TYPES = ("q4_0", "f16", "f32")  # Q4_0 is the official type; F16/F32 on request


def adapter_bytes(tensors: dict[str, np.ndarray], alpha: float, adapter_type: str, family: Family) -> bytes:
    """The `adapter.gguf` member as bytes, built in memory, with the architecture of the family's
    interpreter (llama.cpp refuses an adapter whose architecture is not its base model's)."""
    if adapter_type not in ADAPTER_TYPES:
        raise ValueError(f"adapter type {adapter_type!r} is not one of {ADAPTER_TYPES}")
    return adapter_gguf_bytes(tensors, alpha, adapter_type, arch=family.arch)


def build_program(*, family: Family, spec: str, pseudo_program: str, template: str, adapter_gguf: bytes, rank: int,
                  alpha: float, prefix_steps: int | None, strategy: str, runtime_id: str, compiler_snapshot: str | None,
                  compiler_fingerprint: str, created_at: str | None = None) -> Program:
    """The program with meta.json fields as official programs of its family carry them (template:
    `prompts.interpreter_template` for Compact, `families.standard_template` for Standard);
    `interpreter` is the family's HF id, `prefix_steps` the compiler's for Compact and null for
    Standard (as the official SDK, client.py, and the public reimplementation's profiles.py write
    them); `program_id` hashes the adapter, template, pseudo-program and spec (not the time), so the
    same inputs give the same id."""
    meta: dict[str, Any] = {
        "version": META_VERSION,
        "program_id": content_program_id(adapter_gguf, template, pseudo_program, spec),
        "spec": spec,
        "compiler_snapshot": compiler_snapshot,
        "compiler_fingerprint": compiler_fingerprint,
        "interpreter": family.interpreter,
        "runtime_id": runtime_id,
        "runtime_manifest_version": RUNTIME_MANIFEST_VERSION,
        "lora_rank": rank,
        "lora_alpha": whole_number(alpha),
        "prefix_steps": prefix_steps if family.prefix_steps is not None else None,
        "created_at": created_at or datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "pseudo_program_strategy": strategy,
    }
    if compiler_snapshot is None:
        del meta["compiler_snapshot"]
    return Program(meta=meta, template=template, adapter_gguf=adapter_gguf, pseudo_program=pseudo_program)
