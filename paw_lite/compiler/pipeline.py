"""spec -> `.paw` program on a CPU: pseudo-program (llama.cpp), encoder pass (llama.cpp), mapper
(NumPy), bundle. One 4B model is in memory at a time; each phase is timed and its peak RSS kept."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import paths
from ..atomic import check_writable
from ..base_model import file_sha256
from ..errors import ContextOverflowError, IncompatibleModelError, PawError, require
from ..families import COMPACT, FAMILIES, Family, family_named, family_of_interpreter, standard_template
from ..lora import LoraAdapter, check_peft_folder, write_peft_dir
from ..program import PLACEHOLDER, Program
from ..runtime import PawFunction, function
from .bundle import ADAPTER_TYPES, adapter_bytes, build_program
from .config import CompilerMeta, ModelFiles
from .encoder import TextModel, chat_prompt, depth_layers, encoder_token_ids, hidden_states
from .hf_tokenizer import HFTokenizer
from .interpreter import read_interpreter
from .llama import LlamaModel
from .mapper import Mapper, MapperShape
from .prompt_cache import PromptStateCache, file_identity, spec_independent_prefix
from .prompts import examples_prompt, interpreter_template
from .pseudo import INPUT_RESERVE, MAX_NEW_TOKENS, GreedyGenerator, PseudoResult, fit_to_budget

log = logging.getLogger("paw_lite.compiler")

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class CompileOptions:
    adapter_type: str = "q4_0"
    max_new_tokens: int = MAX_NEW_TOKENS
    input_reserve: int = INPUT_RESERVE
    n_threads: int | None = None
    n_ubatch: int = 512
    pseudo_tokenizer: Path | None = None  # HF tokenizer folders, used instead of the GGUFs' vocabularies
    compiler_tokenizer: Path | None = None
    runtime_id: str | None = None
    cache_dir: Path | None = None  # default: paths.cache_dir() ($PAW_LITE_CACHE)
    prompt_cache: bool = True  # keep the pseudo compiler's spec-independent prompt state on disk
    # "compact" (GPT-2 programs, paw-4b-gpt2) or "standard" (Qwen3-0.6B programs, paw-4b-qwen3-0.6b);
    # None: the one the compiler meta.json given names, else compact
    family: str | None = None

    def __post_init__(self):
        if self.family is not None and self.family not in FAMILIES:
            raise PawError(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.adapter_type not in ADAPTER_TYPES:
            raise PawError(f"adapter type {self.adapter_type!r} is not one of {', '.join(ADAPTER_TYPES)}")
        for name, minimum in (("max_new_tokens", 1), ("n_ubatch", 1), ("input_reserve", 0), ("n_threads", 1)):
            value = getattr(self, name)
            if value is None and name == "n_threads":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PawError(f"{name} must be an integer >= {minimum}, not {value!r}")
        for name in ("pseudo_tokenizer", "compiler_tokenizer", "cache_dir"):  # str or Path accepted
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())
        if self.runtime_id is not None and not paths.is_safe_name(self.runtime_id):
            raise PawError(f"runtime_id {self.runtime_id!r} is not a valid model file name (letters, digits, '.', '_', '-')")


@dataclass
class CompileResult:
    program: Program
    files: ModelFiles
    phases: list[dict[str, Any]] = field(default_factory=list)
    pseudo: PseudoResult | None = None
    encoder_tokens: int = 0
    path: Path | None = None
    family: Family = COMPACT

    @property
    def seconds(self) -> float:
        return round(sum(p["seconds"] for p in self.phases), 3)

    @property
    def peak_rss_mb(self) -> float | None:
        peaks = [p["peak_rss_mb"] for p in self.phases if p["peak_rss_mb"] is not None]
        return max(peaks) if peaks else None

    def summary(self) -> dict[str, Any]:
        return {
            "program": str(self.path) if self.path else None, "program_id": self.program.program_id,
            "spec": self.program.spec, "pseudo_program": self.program.pseudo_program,
            "pseudo_program_strategy": self.program.meta["pseudo_program_strategy"],
            "pseudo_attempts": self.pseudo.attempts if self.pseudo else 0,
            "pseudo_program_tokens": self.pseudo.n_tokens if self.pseudo else None,
            "pseudo_generated_tokens": self.pseudo.generated_tokens if self.pseudo else 0,
            "encoder_tokens": self.encoder_tokens, "adapter_bytes": len(self.program.adapter_gguf),
            "runtime_id": self.program.meta.get("runtime_id"), "family": self.family.name,
            "phases": self.phases, "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb,
            "files": {k: (str(v) if v else None) for k, v in vars(self.files).items()},
        }


# -- timing and memory ---------------------------------------------------------------------------


def _reset_peak_rss() -> None:
    """Linux lets a process reset its peak RSS (VmHWM) to the current RSS; elsewhere the process peak is kept."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource  # not on Windows

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class _Phases:
    def __init__(self, progress: Callable[[str], None] | None):
        self.records: list[dict[str, Any]] = []
        self.progress = progress

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.progress:
            self.progress(f"{name} ...")
        _reset_peak_rss()
        t0 = time.perf_counter()
        yield
        seconds = round(time.perf_counter() - t0, 3)
        record = {"name": name, "seconds": seconds, "peak_rss_mb": _peak_rss_mb()}
        self.records.append(record)
        log.info("%s: %.2f s, peak RSS %s MB", name, seconds, record["peak_rss_mb"])
        if self.progress:
            self.progress(f"{name} done in {seconds:.1f} s (peak RSS {record['peak_rss_mb']} MB)")


# -- the pipeline --------------------------------------------------------------------------------


def compiler_fingerprint(files: ModelFiles) -> str:
    """A cheap identity of the compiler: meta and mapper hashed whole; the multi-GB compiler GGUF by
    its size and its first and last MiB (its metadata and tensor table sit at the start)."""
    h = hashlib.sha256()
    for path in (files.compiler_meta, files.mapper):
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    h.update(file_identity(files.compiler).encode())
    return h.hexdigest()[:16]


def _is_published_interpreter(path: Path, family: Family) -> bool:
    """The family's published interpreter (gpt2-q8_0.gguf, qwen3-0.6b-q6_k.gguf) under another name
    (size, then sha256, as the manifest pins them)."""
    from ..models_dir.manifest import manifest_entry

    entry = manifest_entry(family.name, "interpreter")
    try:
        return path.is_file() and path.stat().st_size == entry.bytes and file_sha256(path) == entry.sha256
    except OSError:
        return False


def _runtime_id(interpreter: Path, options: CompileOptions, family: Family) -> str:
    """The interpreter a program names (runtimes look for `<runtime_id>.gguf`): the family's published
    one unless the program is compiled for another file, whose name then has to be usable as one."""
    if options.runtime_id:
        return options.runtime_id
    if interpreter.name == f"{family.runtime_id}.gguf" or _is_published_interpreter(interpreter, family):
        return family.runtime_id
    rid = interpreter.stem if interpreter.suffix == ".gguf" else interpreter.name
    if not paths.is_safe_name(rid):
        raise PawError(f"{interpreter}: the program would name its interpreter {rid!r}, which runtimes cannot look up "
                       f"as a file name; rename the file (letters, digits, '.', '_', '-') or pass runtime_id=")
    return rid


def _text_model(model: LlamaModel, hf_folder: Path | None) -> TextModel:
    """The tokenizer to use with a GGUF: its own vocabulary, or an HF tokenizer folder checked to
    agree with it on the tokens the compiler writes itself."""
    if hf_folder is None:
        return model
    hf = HFTokenizer(hf_folder)
    for probe in ("<|im_start|>", "<|im_end|>"):
        if hf.single_token(probe) != model.single_token(probe):
            raise IncompatibleModelError(f"{hf_folder}: token {probe} has id {hf.single_token(probe)} but "
                                         f"{model.single_token(probe)} in {model.path}: not this model's tokenizer")
    return hf


def compile_program(spec: str, *, pseudo_program: str | None = None, models: PathLike | None = None,
                    files: ModelFiles = ModelFiles(), options: CompileOptions = CompileOptions(),
                    progress: Callable[[str], None] | None = None,
                    on_token: Callable[[int], None] | None = None,
                    on_encoder: Callable[[int, int], None] | None = None) -> CompileResult:
    """Compile a spec into a Program in memory (see `compile` for the file-writing form).

    progress(message): phase starts and ends. on_token(n): pseudo-program tokens generated so far.
    on_encoder(done, total): the encoder pass, in token-layers, as each layer is evaluated."""
    _check_text("spec", spec)
    if not spec.strip():
        raise PawError("the spec is empty: describe the function to compile")
    if pseudo_program is not None:
        _check_text("pseudo_program", pseudo_program)
        _refuse_file_name(pseudo_program)
    # Before the model files: a run-only install would otherwise be sent to fetch gigabytes first.
    require("llama_cpp", "compile")
    family = _family(options, files)
    files = files.resolved(models, need_pseudo_compiler=pseudo_program is None, family=family.name)
    phases = _Phases(progress)

    with phases("check"):
        meta = CompilerMeta.load(files.compiler_meta)
        named = meta.family()
        if named is not None and named.name != family.name:
            raise IncompatibleModelError(
                f"{files.compiler_meta}: this compiler makes {named.name} programs (interpreter_model "
                f"{meta.interpreter_model!r}), but the compile is for {family.name} programs; compile with "
                f"--family {named.name} (family={named.name!r}), or pass the {family.compiler} files")
        interpreter = read_interpreter(files.interpreter, family)
        interp_config = interpreter.config
        limit = interpreter.n_ctx - options.input_reserve
        if limit <= 0:
            raise PawError(f"input_reserve={options.input_reserve} leaves no room for a pseudo-program in the "
                           f"{interpreter.n_ctx}-token context of {files.interpreter}; lower it (default {INPUT_RESERVE})")
        if options.adapter_type == "q4_0" and meta.lora_rank % 32:
            raise IncompatibleModelError(f"{files.compiler_meta}: lora_rank {meta.lora_rank} is not a multiple of 32, "
                                         f"which a Q4_0 adapter needs (blocks of 32); use adapter type f16 or f32 (--adapter-type / adapter_type=)")
        runtime_id = _runtime_id(files.interpreter, options, family)
        with LlamaModel(files.compiler, vocab_only=True) as vocab:
            compiler_width = vocab.n_embd
            text = _text_model(vocab, options.compiler_tokenizer)
            for probe in ("<|im_end|>", f"<prefix_{meta.prefix_steps}>"):
                text.single_token(probe)  # fails now, not after the pseudo-program is written
        mapper_shape = MapperShape(hidden=compiler_width, interpreter=interp_config, rank=meta.lora_rank, n_bases=meta.lora_num_bases)
        Mapper.check(files.mapper, mapper_shape)
        fingerprint = compiler_fingerprint(files)

    pseudo: PseudoResult | None = None
    if pseudo_program is None:
        with phases("pseudo-program"):
            # The pseudo compiler mostly decodes one token at a time, where repacking does not help.
            with LlamaModel(files.pseudo_compiler, repack=False) as model:
                text = _text_model(model, options.pseudo_tokenizer)
                fixed = spec_independent_prefix(lambda s: text.tokenize(chat_prompt(text, examples_prompt(s)), special=True))
                cache = None
                if options.prompt_cache:
                    cache = PromptStateCache((options.cache_dir or paths.cache_dir()) / "compiler", files.pseudo_compiler,
                                             "kv=f16,repack=0")
                with GreedyGenerator(model, text, max_new_tokens=options.max_new_tokens, n_threads=options.n_threads,
                                     n_ubatch=options.n_ubatch, on_token=on_token, fixed_prefix=fixed,
                                     state_cache=cache) as generate:
                    with interpreter.token_counter() as count_tokens:
                        pseudo = fit_to_budget(spec, generate, count_tokens, limit)
        pseudo_text, strategy = pseudo.text, "examples"
    else:
        pseudo_text, strategy = pseudo_program.strip(), "provided"
        if not pseudo_text:
            raise PawError("the pseudo-program given is empty")
        with interpreter.token_counter() as count_tokens:
            n = count_tokens(pseudo_text)
        if n > limit:
            raise ContextOverflowError(f"the pseudo-program given is {n} interpreter tokens; at most {limit} fit "
                                       f"(context {interpreter.n_ctx} minus {options.input_reserve} for input and output)")
    template = _template(pseudo_text, family)  # refuses a pseudo-program that would break it, before the encoder pass

    with phases("encoder"):
        with LlamaModel(files.compiler) as model:
            text = _text_model(model, options.compiler_tokenizer)
            ids = encoder_token_ids(text, spec, pseudo_text, meta.prefix_steps)
            layers = depth_layers(model.n_layer, interp_config.n_layer)
            states = hidden_states(model, ids, layers, meta.prefix_steps, n_ubatch=options.n_ubatch, n_threads=options.n_threads,
                                   on_progress=on_encoder)

    with phases("mapper"):
        tensors = Mapper.load(files.mapper, mapper_shape)(states)
        del states

    with phases("bundle"):
        adapter = adapter_bytes(tensors, meta.lora_alpha, options.adapter_type, family)
        program = build_program(family=family, spec=spec, pseudo_program=pseudo_text, template=template, adapter_gguf=adapter, rank=meta.lora_rank,
                                alpha=meta.lora_alpha, prefix_steps=meta.prefix_steps, strategy=strategy,
                                runtime_id=runtime_id, compiler_snapshot=meta.snapshot,
                                compiler_fingerprint=fingerprint)
    return CompileResult(program, files, phases.records, pseudo, len(ids), family=family)


def _family(options: CompileOptions, files: ModelFiles) -> Family:
    """The family asked for; else the one the compiler meta.json given names; else Compact (the
    family paw_lite compiled for alone before, whose files a models directory always had)."""
    if options.family is not None:
        return family_named(options.family)
    if files.compiler_meta is not None:
        meta_path = Path(files.compiler_meta).expanduser()
        if meta_path.exists():  # a missing one is reported with the other missing files
            named = CompilerMeta.load(meta_path).family()
            if named is not None:
                return named
    return COMPACT


def _template(pseudo_program: str, family: Family) -> str:
    """The program's prompt_template.txt: the bare pseudo-program and input for Compact programs, the
    Qwen chat wrapping with thinking off for Standard ones."""
    if family.name == COMPACT.name:
        return interpreter_template(pseudo_program)
    if PLACEHOLDER in pseudo_program:
        raise IncompatibleModelError(f"the pseudo-program contains {PLACEHOLDER}, which would break the program's template; remove it")
    return standard_template(pseudo_program, PLACEHOLDER)


def export_peft(program: Program, interpreter: PathLike, folder: PathLike) -> Path:
    """The program's adapter (as stored, dequantized) in PEFT form."""
    family = family_of_interpreter(program.meta.get("interpreter", COMPACT.interpreter), "the program's meta.json")
    config = read_interpreter(Path(interpreter).expanduser(), family).config
    adapter = LoraAdapter.from_program(program, config)
    return write_peft_dir(folder, adapter)


def compile(spec: str, out: PathLike, *, pseudo_program: str | None = None, models: PathLike | None = None,
            compiler: PathLike | None = None, mapper: PathLike | None = None, compiler_meta: PathLike | None = None,
            pseudo_compiler: PathLike | None = None, interpreter: PathLike | None = None, adapter_type: str = "q4_0",
            peft: PathLike | None = None, **options: Any) -> Path:
    """Compile a spec into a `.paw` program written atomically at `out`; returns `out`.

    pseudo_program: your own pseudo-program text (skips the pseudo compiler).
    models: the folder holding the model files (default `$PAW_LITE_MODELS` or the user cache);
    compiler / mapper / compiler_meta / pseudo_compiler / interpreter name files one by one.
    adapter_type: "q4_0" (default, as official programs), "f16" or "f32".
    peft: also write the program's LoRA in PEFT form (adapter_config.json + adapter_model.safetensors) to this folder.
    options: CompileOptions fields (max_new_tokens, n_threads, pseudo_tokenizer, ...)."""
    if out is None:
        raise TypeError("compile: out is the path of the .paw to write; for a program in memory use compile_program")
    result = compile_report(spec, out, pseudo_program=pseudo_program, models=models, compiler=compiler, mapper=mapper,
                            compiler_meta=compiler_meta, pseudo_compiler=pseudo_compiler, interpreter=interpreter,
                            adapter_type=adapter_type, peft=peft, **options)
    assert result.path is not None
    return result.path


def compile_report(spec: str, out: PathLike | None, *, pseudo_program: str | None = None, models: PathLike | None = None,
                   compiler: PathLike | None = None, mapper: PathLike | None = None, compiler_meta: PathLike | None = None,
                   pseudo_compiler: PathLike | None = None, interpreter: PathLike | None = None,
                   adapter_type: str = "q4_0", peft: PathLike | None = None,
                   progress: Callable[[str], None] | None = None, on_token: Callable[[int], None] | None = None,
                   on_encoder: Callable[[int, int], None] | None = None, **options: Any) -> CompileResult:
    """`compile`, returning the program, the files used and the per-phase timings and peak RSS.
    The output paths are checked before the compile; the bundle is written before the PEFT folder."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(CompileOptions)})
    if unknown:
        raise TypeError(f"compile: unknown option(s) {', '.join(unknown)}; the options are "
                        f"{', '.join(f.name for f in dataclasses.fields(CompileOptions) if f.name != 'adapter_type')}")
    files = ModelFiles(*(Path(p).expanduser() if p is not None else None
                         for p in (compiler, mapper, compiler_meta, pseudo_compiler, interpreter)))
    opts = CompileOptions(adapter_type=adapter_type, **options)
    out = None if out is None else Path(out).expanduser()
    if out is not None:
        check_writable(out, "out=")
    if peft is not None:
        check_peft_folder(Path(peft).expanduser(), "peft")
    result = compile_program(spec, pseudo_program=pseudo_program, models=models, files=files, options=opts,
                             progress=progress, on_token=on_token, on_encoder=on_encoder)
    if out is not None:
        result.path = result.program.save(out)
    if peft is not None:
        export_peft(result.program, result.files.interpreter, Path(peft).expanduser())
    return result


def _refuse_file_name(value: str) -> None:
    """A pseudo-program is text over several lines; one line naming an existing file is a path
    passed by mistake (the CLI's --pseudo-program takes a FILE), not a program."""
    line = value.strip()
    if line and "\n" not in line and len(line) < 4096:
        try:
            is_file = Path(line).expanduser().is_file()
        except (OSError, ValueError):  # a name too long for the system, a NUL byte
            is_file = False
        if is_file:
            raise PawError(f"the pseudo-program is one line, {line!r}, which names a file: a pseudo-program is text "
                           f"(in Python pass Path({line!r}).read_text(); on the command line --pseudo-program FILE "
                           f"reads the file)")


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        hint = "; pass the text (read the file first)" if isinstance(value, (os.PathLike, bytes)) else ""
        raise TypeError(f"{name} must be str, not {type(value).__name__}{hint}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PawError(f"the {name} is not valid Unicode: {exc.reason} at position {exc.start}") from None


def compile_and_load(spec: str, out: PathLike | None = None, *, base_model: PathLike | None = None,
                     cache_dir: PathLike | None = None, **kwargs: Any) -> PawFunction:
    """Compile a spec and return the program as a callable (`paw_lite.function`), bound to the
    interpreter it was compiled for (or `base_model`). `out` also saves the bundle there."""
    result = compile_report(spec, out, cache_dir=cache_dir, **kwargs)  # the compiler's prompt cache goes there too
    return function(result.program, base_model=base_model or result.files.interpreter, cache_dir=cache_dir)
