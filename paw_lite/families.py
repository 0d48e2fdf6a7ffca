"""The two program families: what a program's interpreter is, and what a compiler writes for it.

Compact programs run on GPT-2 124M (compiler programasweights/paw-4b-gpt2); Standard programs run
on Qwen3-0.6B (compiler programasweights/paw-4b-qwen3-0.6b, the official SDK's default). The names,
runtime ids and meta.json values are those of the official SDK (programasweights 0.4.14,
client.py and cache.py) and of the public reimplementation avra-m3/program-as-weights-server
(src/paw_server/compile/profiles.py); the templates are those the published programs ship."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import IncompatibleModelError


@dataclass(frozen=True)
class Family:
    """One program family."""

    name: str  # paw_lite's name for it: "compact" or "standard"
    model: str  # the interpreter's model, for messages: "GPT-2", "Qwen3"
    compiler: str  # the published compiler that makes its programs
    interpreter: str  # meta.json `interpreter` (the HF model id the SDK writes)
    runtime_id: str  # meta.json `runtime_id`: the interpreter file is `<runtime_id>.gguf`
    arch: str  # the GGUF architecture of the interpreter and of adapter.gguf
    prefix_steps: int | None  # meta.json `prefix_steps`
    eos_tokens: tuple[str, ...]  # tokens that end an output (the first is the file's EOS)
    chat_wrapped: bool  # whether the template carries the Qwen chat wrapping
    # llama.cpp's `tokenizer.ggml.pre` of the interpreter: the regex text is split by before BPE
    pre_tokenizer: str

    @property
    def convert_command(self) -> str:
        """The command that writes this family's interpreter GGUF from its HF folder."""
        return f"paw-lite convert {self.arch}"


COMPACT = Family(name="compact", model="GPT-2", compiler="paw-4b-gpt2", interpreter="gpt2", runtime_id="gpt2-q8_0", arch="gpt2",
                 prefix_steps=64, eos_tokens=("<|endoftext|>",), chat_wrapped=False, pre_tokenizer="gpt-2")
STANDARD = Family(name="standard", model="Qwen3", compiler="paw-4b-qwen3-0.6b", interpreter="Qwen/Qwen3-0.6B",
                  runtime_id="qwen3-0.6b-q6_k", arch="qwen3", prefix_steps=None,
                  eos_tokens=("<|im_end|>", "<|endoftext|>"), chat_wrapped=True, pre_tokenizer="qwen2")
FAMILIES: dict[str, Family] = {f.name: f for f in (COMPACT, STANDARD)}


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise IncompatibleModelError(f"unknown program family {name!r}; paw_lite knows {', '.join(FAMILIES)}") from None


def family_of_interpreter(interpreter: str, source: str) -> Family:
    """The family of a program from its meta.json `interpreter` (absent means GPT-2, as in early programs)."""
    for family in FAMILIES.values():
        if interpreter == family.interpreter:
            return family
    known = ", ".join(repr(f.interpreter) for f in FAMILIES.values())
    raise IncompatibleModelError(f"{source}: meta.json says interpreter {interpreter!r}; paw_lite runs {known} programs")


def family_of_arch(arch: str, source: str) -> Family:
    """The family whose interpreter has this GGUF architecture."""
    for family in FAMILIES.values():
        if arch == family.arch:
            return family
    known = " and ".join(f"{f.model} ({f.arch!r}, {f.name.capitalize()} programs)" for f in FAMILIES.values())
    raise IncompatibleModelError(f"{source}: architecture is {arch!r}; the interpreter runs {known} models")


def describe(family: Family) -> str:
    """'a Standard program (interpreter Qwen/Qwen3-0.6B, qwen3-0.6b-q6_k.gguf)', for messages."""
    return f"a {family.name.capitalize()} program (interpreter {family.interpreter}, {family.runtime_id}.gguf)"


def check_fits(program_family: Family, interpreter_family: Family, program: str, interpreter: str) -> None:
    """A program runs only on its own family's interpreter: refuse another, saying which to use."""
    if program_family == interpreter_family:
        return
    raise IncompatibleModelError(
        f"{program} is {describe(program_family)}, but the interpreter {interpreter} is a {interpreter_family.model} "
        f"model, which runs {interpreter_family.name.capitalize()} programs; pass base_model= / --base-model "
        f"{program_family.runtime_id}.gguf (or an HF {program_family.model} folder), or leave it out to use "
        f"{program_family.runtime_id}.gguf from the models directory")


def standard_template(pseudo_program: str, placeholder: str) -> str:
    """A Standard program's prompt_template.txt: the Qwen chat wrapping with thinking off (an empty
    think block), as the published Standard programs ship it."""
    return ("<|im_start|>user\n" + pseudo_program.strip() + f"\n\n[INPUT]\n{placeholder}\n[END_INPUT]<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n")
