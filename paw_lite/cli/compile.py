"""`paw-lite compile SPEC -o OUT.paw`: a spec to a program, on this machine."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..compiler.bundle import ADAPTER_TYPES
from ..atomic import check_writable
from ..errors import InvalidFileError, PawError
from ..lora import check_peft_folder
from . import emit, require_positive


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a spec into a .paw program (needs the compile extra and the compiler models)")
    p.add_argument("spec", help="what the function should do, in words (or @FILE to read it from a file, "
                                "without its final line endings)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.paw", help="the program to write")
    p.add_argument("--pseudo-program", type=Path, metavar="FILE", help="use this pseudo-program instead of generating one")
    p.add_argument("--family", choices=("compact", "standard"), default=None,
                   help="the kind of program to make: compact (GPT-2 interpreter, compiler paw-4b-gpt2) or standard "
                        "(Qwen3-0.6B interpreter, compiler paw-4b-qwen3-0.6b); default: the one --compiler-meta names, "
                        "else compact")
    p.add_argument("--models", type=Path, metavar="DIR", help="folder with the compiler files (default: the models directory)")
    add_compiler_files(p)
    p.add_argument("--interpreter", type=Path, metavar="GGUF", help="the interpreter the program is for (GPT-2 for compact, "
                                                                    "Qwen3 for standard programs)")
    p.add_argument("--adapter-type", choices=ADAPTER_TYPES, default="q4_0", help="adapter.gguf tensor type (default q4_0)")
    p.add_argument("--peft", type=Path, metavar="DIR", help="also write the program's LoRA in PEFT form to DIR")
    p.add_argument("--run", metavar="TEXT", help="run the new program on TEXT and print its output")
    p.add_argument("--test", type=Path, metavar="CASES.jsonl",
                   help="run the new program on these cases and print its pass rate (as `paw-lite test`)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="pseudo-program length limit in tokens (default 512)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp (default: all)")
    p.add_argument("--pseudo-tokenizer", type=Path, metavar="DIR", help="HF tokenizer folder of the pseudo compiler (default: the GGUF's)")
    p.add_argument("--compiler-tokenizer", type=Path, metavar="DIR", help="HF tokenizer folder of the compiler (default: the GGUF's)")
    p.add_argument("--json", action="store_true", help="print the result, phase timings and peak memory as JSON")
    p.set_defaults(func=run)


def add_compiler_files(p) -> None:
    """The compiler's files named one by one (what is not named is found in --models): for
    `compile`, and for `serve`'s compiling through the PAW API (p: a parser or argument group)."""
    p.add_argument("--compiler", type=Path, metavar="GGUF", help="the trained compiler")
    p.add_argument("--mapper", type=Path, metavar="SAFETENSORS", help="the mapper weights")
    p.add_argument("--compiler-meta", type=Path, metavar="JSON", help="the compiler's meta.json")
    p.add_argument("--pseudo-compiler", type=Path, metavar="GGUF", help="the model that writes pseudo-programs")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is not part of the text
    except OSError as exc:  # strerror: str(exc) would repeat the path
        raise InvalidFileError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        at = exc.start + path.stat().st_size - len(exc.object)  # the codec counts from after a BOM it dropped
        raise InvalidFileError(f"{path}: cannot read the {what}: not UTF-8 text (byte {at}); save it as UTF-8") from exc


def run(args: argparse.Namespace) -> int:
    from ..compiler import compile_report
    from ..runtime import function

    require_positive(args, "max_new_tokens", "threads")
    check_writable(args.output, "-o")  # before the compile, which takes minutes on the real models
    if args.peft:
        check_peft_folder(args.peft, "--peft")
    # The line ending an editor adds is not part of the spec, as with $(cat spec.txt): kept, it would
    # reach the prompts and give another program than the same spec typed inline.
    spec = _read_text(Path(args.spec[1:]), "spec").rstrip("\r\n") if args.spec.startswith("@") else args.spec
    pseudo = _read_text(args.pseudo_program, "pseudo-program") if args.pseudo_program else None
    cases = None
    if args.test:  # a missing or empty cases file shows before the compile
        from ..cases import read_cases

        cases = read_cases(args.test)

    def progress(message: str) -> None:
        print(f"paw-lite: {message}", file=sys.stderr)

    # Progress goes to stderr with --json too: stdout carries the JSON, and a compile takes minutes.
    from tqdm import tqdm

    bar = None
    if pseudo is None:
        bar = tqdm(total=args.max_new_tokens, desc="pseudo-program tokens", unit="tok", file=sys.stderr, disable=None, leave=False)
    encoder_bar = None

    def on_encoder(done: int, total: int) -> None:  # token-layers of the ~30 s encoder pass, shown as a percentage
        nonlocal encoder_bar
        if encoder_bar is None:
            if bar is not None:
                bar.close()  # the pseudo-program is written by now
            encoder_bar = tqdm(total=total, desc="encoder", file=sys.stderr, disable=None, leave=False,
                               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        encoder_bar.update(done - encoder_bar.n)
        if done >= total:
            encoder_bar.refresh()  # tqdm skips draws closer than 0.1 s apart: the last one could be 0%

    try:
        result = compile_report(
            spec, args.output, pseudo_program=pseudo, models=args.models, compiler=args.compiler, mapper=args.mapper,
            compiler_meta=args.compiler_meta, pseudo_compiler=args.pseudo_compiler, interpreter=args.interpreter,
            adapter_type=args.adapter_type, peft=args.peft, progress=progress,
            on_token=(lambda n: bar.update(n - bar.n)) if bar is not None else None, on_encoder=on_encoder,
            max_new_tokens=args.max_new_tokens, n_threads=args.threads, family=args.family,
            pseudo_tokenizer=args.pseudo_tokenizer, compiler_tokenizer=args.compiler_tokenizer)
    finally:
        for b in (bar, encoder_bar):
            if b is not None:
                b.close()
    summary = result.summary()
    lines = [f"wrote {result.path} (program {result.program.program_id}, {len(result.program.adapter_gguf):,}-byte adapter)",
             *(f"  {p['name']:<15} {p['seconds']:7.1f} s   peak RSS {p['peak_rss_mb']} MB" for p in result.phases),
             f"  {'total':<15} {result.seconds:7.1f} s   peak RSS {result.peak_rss_mb} MB"]
    lines.append(f"  runs on      {summary['runtime_id']}.gguf (the interpreter runtimes look up; a {result.family.name} program)")
    if args.peft:
        lines.append(f"PEFT adapter in {args.peft}")
        summary["peft"] = str(args.peft)
    if args.run is not None:
        t0 = time.perf_counter()
        try:
            with function(result.program, base_model=result.files.interpreter) as fn:
                output = fn(args.run)
        except PawError as exc:
            raise type(exc)(f"wrote {result.path}, but running it on the --run text failed: {exc}") from exc
        summary["run"] = {"input": args.run, "output": output, "seconds": round(time.perf_counter() - t0, 3)}
        lines += [f"input:  {args.run}", f"output: {output}"]
    if cases is not None:
        summary["test"], line = _test(result, cases, args.test)
        lines.append(line)
    emit(args, summary, "\n".join(lines))
    return 0


def _test(result, cases: list, path: Path) -> tuple[dict, str]:
    """The new program's report on the --test cases (the JSON report of `paw-lite test`) and its
    pass-rate line."""
    import dataclasses

    from ..evaluate import evaluate
    from .test import progress_bar, rate_line

    try:
        with progress_bar(len(cases), "test cases") as bar:
            report = evaluate(result.program, cases, base_model=result.files.interpreter, on_case=lambda r: bar.update(1))
    except PawError as exc:
        raise type(exc)(f"wrote {result.path}, but testing it on {path} failed: {exc}") from exc
    report = dataclasses.replace(report, program={**report.program, "source": str(result.path)}, cases_file=str(path))
    line = f"test:   {rate_line(report)} on {path}"
    invalid = report.invalid()
    if invalid:
        line += "".join(f"\n  could not be read: {r.reason}" for r in invalid)
    return report.to_dict(), line
