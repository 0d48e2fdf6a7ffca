"""A GGUF file's metadata and tensor table as plain values, for the converter's checks.

Parsing is `paw_lite.gguf_file.read_index` (gguf-py's GGUFReader spends ~8 s of CPU building views
of a Qwen vocabulary's 151k tokens and merges); this only reshapes its result: decoded values by
key, tensors by name with NumPy-order shapes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType

from paw_lite.gguf_file import read_index


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # NumPy order (slowest first)
    qtype: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFMeta:
    path: Path
    fields: dict[str, Any]
    tensors: dict[str, TensorEntry]


def read_gguf_meta(path: str | os.PathLike[str]) -> GGUFMeta:
    """Keys and tensor table of a GGUF file; every tensor's extent is checked against the file size."""
    index = read_index(path)
    tensors = {t.name: TensorEntry(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type,
                                   t.data_offset, t.n_bytes) for t in index.tensors}
    return GGUFMeta(index.path, {k: f.value for k, f in index.fields.items()}, tensors)
