"""Step 4 (the official SDK's importer, programasweights 0.4.14 client.py): LoRA tensors + pseudo-program -> a `Program` with the official members
and meta fields, content-addressed."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from ..lora import adapter_gguf_bytes, whole_number
from ..program import Program, content_program_id

META_VERSION = 4
RUNTIME_MANIFEST_VERSION = 1
ADAPTER_TYPES = ("q4_0", "f16", "f32")  # Q4_0 is the official type; F16/F32 on request


def adapter_bytes(tensors: dict[str, np.ndarray], alpha: float, adapter_type: str) -> bytes:
    """The `adapter.gguf` member as bytes, built in memory."""
    if adapter_type not in ADAPTER_TYPES:
        raise ValueError(f"adapter type {adapter_type!r} is not one of {ADAPTER_TYPES}")
    return adapter_gguf_bytes(tensors, alpha, adapter_type)


def build_program(*, spec: str, pseudo_program: str, template: str, adapter_gguf: bytes, rank: int, alpha: float,
                  prefix_steps: int, strategy: str, runtime_id: str, compiler_snapshot: str | None,
                  compiler_fingerprint: str, created_at: str | None = None) -> Program:
    """The program with meta.json fields as official programs carry them (template: the pseudo-program's
    `prompts.interpreter_template`); `program_id` hashes the adapter, template, pseudo-program and spec
    (not the time), so the same inputs give the same id."""
    meta: dict[str, Any] = {
        "version": META_VERSION,
        "program_id": content_program_id(adapter_gguf, template, pseudo_program, spec),
        "spec": spec,
        "compiler_snapshot": compiler_snapshot,
        "compiler_fingerprint": compiler_fingerprint,
        "interpreter": "gpt2",
        "runtime_id": runtime_id,
        "runtime_manifest_version": RUNTIME_MANIFEST_VERSION,
        "lora_rank": rank,
        "lora_alpha": whole_number(alpha),
        "prefix_steps": prefix_steps,
        "created_at": created_at or datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "pseudo_program_strategy": strategy,
    }
    if compiler_snapshot is None:
        del meta["compiler_snapshot"]
    return Program(meta=meta, template=template, adapter_gguf=adapter_gguf, pseudo_program=pseudo_program)
