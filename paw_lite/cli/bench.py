"""`paw-lite bench [--json]`: the NumPy interpreter against llama.cpp, side by side;
`paw-lite bench --constrained`: constrained outputs against the official runtime's logits-processor way;
`paw-lite bench --standard`: Standard programs (the Qwen3-0.6B interpreter) against the official runtime's way.

The benchmarks live in `benchmarks/interpreter_bench.py`, `constrained_bench.py` and
`standard_bench.py` of a source checkout (they build their random models from the real GPT-2 vocabulary in the
llama-cpp-python sdist, a development dependency); this command runs one and prints its table or JSON."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ..errors import PawError, require
from ..runtime import DEFAULT_BATCH_SIZE
from . import emit, require_positive

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "interpreter_bench.py"
CONSTRAINED_SCRIPT = BENCH_SCRIPT.with_name("constrained_bench.py")
STANDARD_SCRIPT = BENCH_SCRIPT.with_name("standard_bench.py")


def bench_module(script: Path = BENCH_SCRIPT) -> ModuleType:
    """A benchmark script as a module, by its path (benchmarks/ is no package), named
    `paw_lite_<stem>`: one copy per process, whoever loads it first (`paw-lite bench`, or another
    benchmark that builds on interpreter_bench.py)."""
    name = f"paw_lite_{script.stem}"
    if name in sys.modules:
        return sys.modules[name]
    if not script.exists():
        raise PawError(f"{script}: not found; `paw-lite bench` runs from a source checkout of paw-lite "
                       f"(pip install -e .), where benchmarks/{script.name} lives")
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time the NumPy interpreter against llama.cpp on the same files",
                       description="Cold start, prefix, one call, decode, prefill, throughput and peak RSS of "
                                   "paw_lite and llama.cpp (llama-cpp-python) on a full-size random GPT-2 "
                                   "with a rank-64 adapter; medians of fresh processes, ratio per row.")
    add_arguments(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--constrained", action="store_true",
                       help="instead: constrained outputs (choices, a JSON schema, fn.map with choices) against the "
                            "official runtime's way, llama.cpp eval + sample with a masking logits processor "
                            "(benchmarks/constrained_bench.py)")
    which.add_argument("--standard", action="store_true",
                       help="instead: a Standard program on a full-size random Qwen3-0.6B (Q6_K) with a rank-64 "
                            "adapter on its 196 modules, against the official runtime's way, llama.cpp eval + "
                            "sample (benchmarks/standard_bench.py; builds its 620 MB files once)")
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, shared with `python benchmarks/interpreter_bench.py`."""
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per engine (default 3)")
    p.add_argument("--inner", type=int, default=7, help="timed runs per measure in each process (default 7)")
    p.add_argument("--calls", type=int, default=256, help="calls in the throughput measure (default 256)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"paw_lite fn.map batch size (default {DEFAULT_BATCH_SIZE}, fn.map's own)")
    p.add_argument("--quick", action="store_true", help="1 repeat, 3 timed runs, 32 calls: checks the setup")
    p.add_argument("--cache", type=Path, default=None, help="where the generated files live (default: the benchmark's own folder under benchmarks/.cache)")
    p.add_argument("--output", type=Path, help="also write the JSON result here (default <cache>/results.json)")


def run(args: argparse.Namespace) -> int:
    require("llama_cpp", "compile")
    if args.constrained:
        require("llguidance", "constrain")
    require_positive(args, "repeats", "inner", "calls", "batch_size")
    script = CONSTRAINED_SCRIPT if args.constrained else STANDARD_SCRIPT if getattr(args, "standard", False) else BENCH_SCRIPT
    bench = bench_module(script)
    if args.cache is None:
        args.cache = bench.DEFAULT_CACHE
    try:
        result = bench.main_from_args(args)
    except RuntimeError as exc:
        # A worker process failed (its stderr is in the message), or paw_lite/testing/vocab.py could not
        # download or read the llama-cpp-python sdist with the GPT-2 vocabulary (its SdistError, a
        # RuntimeError, names the file and how to supply it offline).
        raise PawError(f"benchmark failed: {exc}") from None
    emit(args, result, bench.format_table(result))
    print(f"(JSON written to {args.output or args.cache / getattr(bench, 'OUTPUT_NAME', 'results.json')})", file=sys.stderr)
    return 0
