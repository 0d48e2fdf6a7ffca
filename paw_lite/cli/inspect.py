"""`paw-lite inspect PROGRAM`: what a program holds, without loading a model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..lora import describe_adapter_gguf
from ..program import ADAPTER, Program
from . import emit, printable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a program's spec, pseudo-program, interpreter and adapter")
    p.add_argument("program", help="a .paw bundle or a program folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prog = Program.load(args.program)
    adapter = describe_adapter_gguf(prog.adapter_gguf, f"{prog.source}: {ADAPTER}")
    src = Path(args.program)
    info = {
        "program": str(src),
        "program_id": prog.program_id,
        "spec": prog.spec,
        "pseudo_program": prog.pseudo_program,
        "family": prog.family.name,
        "interpreter": prog.family.interpreter,
        "runtime_id": prog.runtime_id,
        "compiler_snapshot": prog.meta.get("compiler_snapshot"),
        "meta_version": prog.meta.get("version"),
        "adapter": adapter,
        "sizes": {"bundle_bytes": os.path.getsize(src) if src.is_file() else None, "adapter_bytes": len(prog.adapter_gguf),
                  "template_chars": len(prog.template)},
    }
    kinds = ", ".join(f"{n} {t}" for t, n in adapter["tensor_types"].items())
    text = "\n".join([
        f"program      {printable(info['program'])}",
        f"program id   {printable(info['program_id'])}",
        f"spec         {printable(prog.spec)}",
        f"interpreter  {printable(str(info['interpreter']))} (runtime {printable(str(info['runtime_id']))}, "
        f"a {prog.family.name.capitalize()} program)",
        f"adapter      rank {adapter['rank']}, alpha {adapter['alpha']:g}, {adapter['n_tensors']} tensors ({printable(kinds)}), {len(prog.adapter_gguf):,} bytes",
        f"bundle       {info['sizes']['bundle_bytes']:,} bytes" if info["sizes"]["bundle_bytes"] else "bundle       (folder)",
        "pseudo-program:",
        *("  " + line for line in printable(prog.pseudo_program).splitlines()),
    ])
    emit(args, info, text)
    return 0
