"""Run a program over a Dask collection: `paw_lite.dask.map(program, bag_or_series)`.

    import dask.bag as db
    import paw_lite.dask

    outputs = paw_lite.dask.map("triage.paw", db.read_text("logs-*.txt").map(str.rstrip))
    ddf["label"] = paw_lite.dask.map("triage.paw", ddf["text"])

Each partition runs through `fn.map` on a worker, which loads the program once (see `worker`);
outputs are those of a local `fn.map`, in input order. Needs the `dask` extra:
`pip install 'paw-lite[dask]'` (on the client and on every worker). See docs/dask.md."""

from __future__ import annotations

import os
from typing import Any

from ..errors import require
from ..program import Program
from ..runtime import DEFAULT_BATCH_SIZE
from .shipping import MapOptions, ShippedProgram, options, ship

__all__ = ["MapOptions", "ShippedProgram", "map", "ship"]


def map(program: str | os.PathLike[str] | Program | ShippedProgram, texts: Any, *, max_tokens: int | None = None,
        base_model: str | os.PathLike[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
        choices: list[str] | None = None, regex: str | None = None,
        json_schema: dict[str, Any] | str | None = None) -> Any:
    """The program's outputs for a Dask Bag of str, or a Dask Series of str, as a lazy collection
    of the same kind and partitions: a Bag in input order, or a Series on the input's index (so
    `ddf["label"] = paw_lite.dask.map(prog, ddf["text"])` adds a column).

    program: a `.paw` file or program folder (read here, on the client), a Program, or a
    ShippedProgram from `ship` (to reuse one across maps). It travels to the workers as bytes.
    base_model: the interpreter as a path on the workers; None for each worker's models directory
    ($PAW_LITE_MODELS or its user cache), as a local run finds it.
    max_tokens, batch_size: as `fn.map`, for each partition.
    choices / regex / json_schema: one constraint for every input, as `fn.map` (checked here); an
    output a constraint cuts short fails its partition with IncompleteOutputError, as `fn.map`."""
    dask = require("dask", "dask")
    opts = options(max_tokens, batch_size, base_model, choices, regex, json_schema)
    shipped = program if isinstance(program, ShippedProgram) else ship(program)
    # One key in the graph that every partition depends on: each worker receives the bytes once.
    # traverse=False: a dataclass would otherwise be unpacked into tasks.
    prog = dask.delayed(shipped, name=f"paw-lite-program-{shipped.digest[:16]}", traverse=False)
    from . import worker

    import dask.bag

    if isinstance(texts, dask.bag.Bag):
        return texts.map_partitions(worker.run_texts, prog, opts)
    frame = _dataframe_module(texts)
    if frame is not None and isinstance(texts, frame.Series):
        import pandas as pd

        meta = pd.Series([], name=texts.name, dtype=worker.output_dtype(texts.dtype))
        return texts.map_partitions(worker.run_series, prog, opts, meta=meta)
    if frame is not None and isinstance(texts, frame.DataFrame):
        raise TypeError("paw_lite.dask.map takes one column of text, not a whole DataFrame: pass ddf['text']")
    raise TypeError(f"paw_lite.dask.map takes a dask.bag.Bag or a dask.dataframe.Series of str, not "
                    f"{type(texts).__module__}.{type(texts).__name__}; for a list use paw_lite.function(...).map, "
                    f"or dask.bag.from_sequence(texts, npartitions=N)")


def _dataframe_module(obj: Any):
    """dask.dataframe when obj comes from it (importing it needs pandas), else None."""
    if not type(obj).__module__.startswith(("dask.dataframe", "dask_expr")):
        return None
    import dask.dataframe

    return dask.dataframe
