"""`paw-lite convert qwen3|gpt2|mapper SRC -o OUT`: the published checkpoints to what paw_lite runs."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import TMP_SUFFIX, check_writable, checked_or_removed
from ..errors import PawError, malformed_file
from . import emit, require_positive


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert HF checkpoints to GGUF / safetensors (no torch needed)")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    q = kinds.add_parser("qwen3", help="an HF Qwen3 folder (the compilers) -> GGUF")
    q.add_argument("src", help="HF folder: config.json, *.safetensors (+ index), tokenizer.json, tokenizer_config.json")
    q.add_argument("--type", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"],
                   help="weight type; default q8_0 for the trained compiler (its hidden states feed the mapper), "
                        "q4_k_m for a stock Qwen3 such as the pseudo compiler")

    g = kinds.add_parser("gpt2", help="an HF GPT-2 folder (the interpreter) -> GGUF in the official layout")
    g.add_argument("src", help="HF folder: config.json, model.safetensors or pytorch_model.bin, tokenizer files")
    g.add_argument("--type", default="q8_0", choices=["f32", "f16", "q8_0"], help="matrix type (default q8_0, as the official file)")

    m = kinds.add_parser("mapper", help="lora_mapper.pt -> mapper.safetensors (fp32), read without torch")
    m.add_argument("src", help="the torch state dict lora_mapper.pt")
    m.add_argument("--meta", help="the compiler's meta.json (rank, number of bases); "
                                  "default: the published compiler's rank 64 and 64 bases")
    m.add_argument("--hidden", type=int, default=None, help="compiler hidden width (default 2560, Qwen3-4B)")
    m.add_argument("--interpreter", help="the interpreter the programs run on: a GPT-2 GGUF or HF folder, or a Qwen3 GGUF (default: the published one of the family the --meta names)")

    for sp in (q, g, m):
        sp.add_argument("-o", "--output", required=True, help="output file (written atomically)")
        sp.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
        sp.set_defaults(func=run)


def _progress(total: int, unit: str) -> tuple[Any, Callable[[str], None]]:
    from tqdm import tqdm

    # Every item is drawn (mininterval 0): a tensor takes seconds on the real models, and the shard
    # or pass it belongs to must not depend on when tqdm last drew.
    bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False, disable=None, mininterval=0)

    def on_item(name: str) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    return bar, on_item


def _qwen3(args: argparse.Namespace) -> dict[str, Any]:
    from ..convert.qwen3 import Qwen3Source, convert_qwen3
    from ..convert.verify import verify_gguf

    from ..models_dir.importing import qwen3_folder_role

    source = Qwen3Source(args.src)  # headers only: the tensor count for the progress bar
    if args.type is None:
        args.type = "q8_0" if qwen3_folder_role(source.folder) == "compiler" else "q4_k_m"
    shards = sorted({st.path.name for _, st in source.tensors.values()})
    bar, on_tensor = _progress(len(source.tensors), "tensor")
    bar.set_description(f"{len(shards)} file(s)")

    quantizing = False

    def on_item(name: str) -> None:
        if quantizing:  # llama.cpp's quantizer reads the intermediate file, not a shard
            on_tensor(name)
            return
        _, st = source.tensors[name]
        on_tensor(f"{st.path.name}: {name}")  # which shard is being read, and the tensor

    def on_pass(count: int) -> None:
        nonlocal quantizing
        quantizing = True
        bar.reset(total=count)
        bar.set_postfix_str("", refresh=False)
        bar.set_description(f"llama.cpp quantize to {args.type.upper()}")

    try:
        out = convert_qwen3(args.src, args.output, args.type, on_item, on_pass)
    finally:
        bar.close()
    return {"kind": "qwen3", "n_files": len(shards), **checked_or_removed(out, lambda: verify_gguf(out, qwen3_role(out)))}


def qwen3_role(path: Path) -> str:
    """The trained compiler is the Qwen3 whose vocabulary holds the <prefix_k> tokens."""
    from ..convert.gguf_meta import read_gguf_meta

    tokens = read_gguf_meta(path).fields.get("tokenizer.ggml.tokens") or []
    return "compiler" if "<prefix_1>" in tokens else "pseudo_compiler"


def _gpt2(args: argparse.Namespace) -> dict[str, Any]:
    from ..hf_gpt2 import hf_gpt2_config
    from ..convert.gpt2 import convert_hf_gpt2
    from ..convert.verify import verify_gguf

    cfg = hf_gpt2_config(Path(args.src) / "config.json")
    bar, on_tensor = _progress(len(cfg.tensor_shapes()), "tensor")
    try:
        out = convert_hf_gpt2(args.src, args.output, args.type, on_tensor)
    finally:
        bar.close()
    return {"kind": "gpt2", **checked_or_removed(out, lambda: verify_gguf(out, "interpreter"))}


def _mapper(args: argparse.Namespace) -> dict[str, Any]:
    from ..compiler.config import CompilerMeta
    from ..convert.mapper import QWEN3_4B_HIDDEN, convert_mapper, mapper_shape

    meta = CompilerMeta.load(args.meta) if args.meta else None
    family = meta.family() if meta else None
    interpreter = None
    if args.interpreter:
        from ..compiler.interpreter import interpreter_family, read_interpreter

        family = family or interpreter_family(Path(args.interpreter))
        interpreter = read_interpreter(Path(args.interpreter), family).config
    shape = mapper_shape(meta, interpreter, QWEN3_4B_HIDDEN if args.hidden is None else args.hidden, family)
    bar, on_tensor = _progress(len(shape.expected(1)), "tensor")
    try:
        out = convert_mapper(args.src, args.output, shape, on_tensor)
    finally:
        bar.close()
    return {"kind": "mapper", "rank": shape.rank, "n_bases": shape.n_bases, "hidden": shape.hidden,
            "interpreter_layers": shape.interpreter.n_layer, "bytes": os.path.getsize(out)}


def run(args: argparse.Namespace) -> int:
    if args.kind == "mapper":
        require_positive(args, "hidden")
    src, output = Path(args.src).resolve(), Path(args.output).resolve()
    # Inside an HF folder only a .gguf may be replaced (a previous conversion): the converters read
    # their folder's safetensors, bin, JSON and tokenizer files, never a .gguf.
    if output == src or src in output.parents and output.exists() and output.suffix != ".gguf":
        raise PawError(f"-o {args.output} would write over the source {args.src}; pick another output path")
    check_writable(args.output, "-o")  # before the conversion, not after it
    start = time.perf_counter()
    try:
        with malformed_file(args.src, {"qwen3": "HF Qwen3 folder", "gpt2": "HF GPT-2 folder", "mapper": "mapper checkpoint"}[args.kind]):
            info = {"qwen3": _qwen3, "gpt2": _gpt2, "mapper": _mapper}[args.kind](args)
    except OSError as exc:  # disk full, permissions: one line like every other failure
        # the write goes through a temporary file beside the output; the user knows the output's name
        where = exc.filename
        if where is None or (Path(where).name.startswith(".") and str(where).endswith(TMP_SUFFIX)):
            where = args.output
        raise PawError(f"{where}: {exc.strerror or exc}") from exc
    info = {"source": str(args.src), "output": str(args.output), **({"type": args.type} if "type" in args else {}),
            **info, "seconds": round(time.perf_counter() - start, 2)}
    text = (f"wrote {args.output} ({info['bytes']:,} bytes, {args.kind}"
            + (f" {args.type.upper()}" if "type" in args else "") + f") in {info['seconds']:.1f} s")
    emit(args, info, text)
    return 0
