"""What a Dask task carries to a worker: the program as bytes and the options of the map.

Workers need not see the client's files: the program travels inside the task graph as the bytes
of its bundle members (one key in the graph, so each worker receives it once, whatever the number
of partitions). The interpreter does not travel (it is ~130 MB and every worker of a map needs the
same one): each worker finds it as a local run would, from `base_model` or its own models directory."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from ..constraints import OutputConstraint
from ..program import Program
from ..runtime import DEFAULT_BATCH_SIZE, _checked_count, _checked_max_tokens


@dataclass(frozen=True)
class ShippedProgram:
    """A program's bundle members as bytes, with a digest of them that names the program on a worker."""

    members: dict[str, bytes] = field(repr=False)
    source: str  # where the client read it: error messages on the worker name it
    digest: str  # sha256 over the members, names in order: the key of a worker's loaded functions

    def program(self) -> Program:
        """The program, read back with every check `Program.load` makes."""
        return Program.from_members(self.members, self.source)


def ship(program: str | os.PathLike[str] | Program) -> ShippedProgram:
    """Read (and check) a program on the client, so a bad file fails here and not on every worker."""
    prog = program.checked() if isinstance(program, Program) else Program.load(program)
    members = prog.members()
    h = hashlib.sha256()
    for name in sorted(members):
        h.update(name.encode() + b"\0" + hashlib.sha256(members[name]).digest())
    return ShippedProgram(members, prog.source, h.hexdigest())


@dataclass(frozen=True)
class MapOptions:
    """How each partition runs: the keywords of `fn.map` that change outputs or memory, and the
    interpreter to use on the workers. A new keyword of `fn.map` becomes a field here and an entry
    of `map_kwargs`; nothing else between the caller and `fn.map` needs to change."""

    max_tokens: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    base_model: str | None = None  # a path as the workers see it; None: each worker's models directory
    constraint: OutputConstraint | None = None  # choices / regex / json_schema, checked on the client

    def __post_init__(self) -> None:  # refused on the client, before a graph is built
        _checked_max_tokens(self.max_tokens)
        _checked_count("batch_size", self.batch_size)
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise TypeError(f"base_model must be a path (str or os.PathLike) that exists on every worker, or None; "
                            f"got {type(self.base_model).__name__} (a loaded BaseModel cannot be shipped to workers)")

    def map_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_tokens": self.max_tokens, "batch_size": self.batch_size}
        c = self.constraint
        if c is not None:  # back to fn.map's keyword (a schema as its canonical JSON text)
            kwargs[c.kind] = list(c.choices) if c.kind == "choices" else c.pattern
        return kwargs


def options(max_tokens: int | None, batch_size: int, base_model: str | os.PathLike[str] | None,
            choices: list[str] | None = None, regex: str | None = None,
            json_schema: dict[str, Any] | str | None = None) -> MapOptions:
    if isinstance(base_model, os.PathLike):
        base_model = os.fspath(base_model)
    return MapOptions(max_tokens, batch_size, base_model, OutputConstraint.of(choices, regex, json_schema))
