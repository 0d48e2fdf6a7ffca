"""What a compile needs of the interpreter file: its hyperparameters (the mapper's layer count and
module widths), the positions a program may fill, and a token counter for the pseudo-program budget.

A Compact program's interpreter is a GPT-2 GGUF (or HF folder); a Standard program's is a Qwen3 GGUF
(the published `qwen3-0.6b-q6_k.gguf`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import IncompatibleModelError
from ..families import COMPACT, STANDARD, Family, family_of_arch
from ..gguf_file import get_field, get_str, read_index
from ..gpt2_layout import GPT2Config
from ..qwen3_layout import Qwen3Config

# Qwen3 has rotary positions and a 40,960-token context; a Standard program's pseudo-program, input and
# output are held to 2048 tokens, the public reimplementation avra-m3/program-as-weights-server's
# `max_interpreter_tokens` for paw-4b-qwen3-0.6b (profiles.py: "a serving-side headroom choice"; the
# paper trained with 1024). GPT-2's own position table is its limit.
STANDARD_MAX_TOKENS = 2048


@dataclass(frozen=True)
class InterpreterFile:
    path: Path
    family: Family
    config: GPT2Config | Qwen3Config
    n_ctx: int  # positions a program may use: pseudo-program, input and output
    _tokenizer: Any = None  # Compact: the GPT-2 tokenizer read with the header

    @contextmanager
    def token_counter(self) -> Iterator[Callable[[str], int]]:
        """len(tokens(text)) in the interpreter's own vocabulary, special tokens recognised as the
        runtime tokenizes a template. Standard: llama.cpp's tokenizer over the GGUF's vocabulary."""
        if self._tokenizer is not None:
            yield lambda text: len(self._tokenizer.encode(text))
            return
        from .llama import LlamaModel

        with LlamaModel(self.path, vocab_only=True) as vocab:
            yield lambda text: len(vocab.tokenize(text, special=True))


def read_interpreter(path: Path, family: Family) -> InterpreterFile:
    """The interpreter of `family` at `path`, checked from its header: a file of the other family is
    refused with the fix."""
    if family.name == COMPACT.name:
        if path.is_file():
            _check_arch(path, family)
        from ..base_model import read_header

        config, tokenizer = read_header(path)
        if not isinstance(config, GPT2Config):  # an HF folder of another model (a GGUF's architecture is checked above)
            raise IncompatibleModelError(f"{path}: not a GPT-2 model, but this compile makes compact programs, which run on "
                                         f"GPT-2; pass a GPT-2 interpreter (--interpreter, interpreter=) or compile for "
                                         f"the other family (--family, family=)")
        return InterpreterFile(path, family, config, config.n_ctx, tokenizer)
    if path.is_dir():
        raise IncompatibleModelError(f"{path}: is a folder; a Standard program's interpreter is a Qwen3 GGUF file "
                                     f"({STANDARD.runtime_id}.gguf)")
    index = _check_arch(path, family)
    config = Qwen3Config.from_gguf(index, path)
    return InterpreterFile(path, family, config, min(config.n_ctx, STANDARD_MAX_TOKENS))


def _check_arch(path: Path, family: Family):
    index = read_index(path)
    if get_field(index, "adapter.type", path, None) == "lora" or get_field(index, "general.type", path, None) == "adapter":
        raise IncompatibleModelError(f"{path}: is a LoRA adapter, not an interpreter model; pass {family.runtime_id}.gguf")
    arch = get_str(index, "general.architecture", path)
    if arch != family.arch:
        try:
            other = f"the {family_of_arch(arch, str(path)).name} family's interpreter"
        except IncompatibleModelError:
            other = "no PAW interpreter"
        raise IncompatibleModelError(
            f"{path}: architecture {arch!r} ({other}), but this compile makes {family.name} programs, which run on "
            f"{family.interpreter} ({family.arch!r}); pass that interpreter (--interpreter, interpreter=) or compile for "
            f"the other family (--family, family=)")
    return index


def interpreter_family(path: Path) -> Family:
    """The family whose interpreter this file is, from its architecture (an HF folder: GPT-2's)."""
    if path.is_dir():
        return COMPACT
    return family_of_arch(get_str(read_index(path), "general.architecture", path), str(path))
