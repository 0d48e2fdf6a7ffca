"""Step 1 (the paper, arXiv 2607.02512, and the public reimplementation avra-m3/program-as-weights-server): the pseudo compiler writes a pseudo-program from the spec, greedily, and
it must leave room for inputs in the interpreter's context."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ContextOverflowError, PawError
from .encoder import TextModel, chat_prompt
from .llama import ContextSettings, LlamaContext, LlamaModel
from .prompt_cache import PromptStateCache
from .prompts import examples_prompt

log = logging.getLogger("paw_lite.compiler")

MAX_NEW_TOKENS = 512
# Where generation stops: Qwen3's generation_config eos_token_id, as transformers' generate uses it.
# llama.cpp's end-of-generation set is wider (it adds <|fim_pad|>, <|repo_name|>, <|file_sep|>).
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
INPUT_RESERVE = 256  # interpreter positions kept free for the input and the output
REGENERATIONS = 2
# Appended to the user message when a pseudo-program did not fit (the published prompt asks for
# < 250 tokens already; this repeats the request with the measured numbers).
SHORTER_NOTE = ("\n\nIMPORTANT: your previous pseudo-program was {n_tokens} tokens long, but at most {limit} tokens fit. "
                "Write a much shorter pseudo-program: a one-paragraph task and 3 short examples, ending with [END_PSEUDO_PROGRAM].")


@dataclass(frozen=True)
class PseudoResult:
    text: str
    n_tokens: int  # in the interpreter's tokenizer
    attempts: int
    generated_tokens: int  # in the pseudo compiler's tokenizer, summed over attempts


def fit_to_budget(spec: str, generate: Callable[[str], tuple[str, int]], count_tokens: Callable[[str], int],
                  limit: int, regenerations: int = REGENERATIONS) -> PseudoResult:
    """Generate from the examples prompt; while the result is over `limit` interpreter tokens, ask
    again with a shorter-output note (at most `regenerations` times), then fail with the numbers."""
    message = examples_prompt(spec)
    generated = 0
    sizes = []
    for attempt in range(1, regenerations + 2):
        text, n_new = generate(message)
        generated += n_new
        n_tokens = count_tokens(text)
        if not text:
            raise PawError("the pseudo compiler wrote an empty pseudo-program; check the pseudo compiler model, or pass "
                           "your own with --pseudo-program FILE (pseudo_program= in Python)")
        if n_tokens <= limit:
            if "[END_PSEUDO_PROGRAM]" not in text:
                log.warning("the pseudo-program has no [END_PSEUDO_PROGRAM] marker (it may have been cut at %d tokens)", n_new)
            return PseudoResult(text, n_tokens, attempt, generated)
        sizes.append(n_tokens)
        log.info("pseudo-program attempt %d is %d interpreter tokens, over the limit of %d", attempt, n_tokens, limit)
        message = examples_prompt(spec) + SHORTER_NOTE.format(n_tokens=n_tokens, limit=limit)
    raise ContextOverflowError(
        f"the pseudo compiler wrote pseudo-programs of {', '.join(map(str, sizes))} interpreter tokens in "
        f"{len(sizes)} attempts; at most {limit} fit (the interpreter's context less room for input and output). "
        "Shorten the spec, or write the pseudo-program yourself and pass it with --pseudo-program FILE (pseudo_program= in Python)")


class GreedyGenerator:
    """Greedy decoding with one llama.cpp context; a new prompt reuses the cached positions it shares
    with the previous one (a regeneration differs only near the end of the prompt)."""

    def __init__(self, model: LlamaModel, text: TextModel, *, max_new_tokens: int = MAX_NEW_TOKENS,
                 n_threads: int | None = None, n_ubatch: int = 512, on_token: Callable[[int], None] | None = None,
                 fixed_prefix: list[int] | None = None, state_cache: PromptStateCache | None = None):
        """fixed_prefix: token ids most prompts start with; they are always evaluated on their own, and
        their state is kept in state_cache when one is given (so a prompt gives the same numbers
        with or without the cache)."""
        self.model, self.text = model, text
        self.stop_ids = frozenset(text.single_token(t) for t in STOP_TOKENS)
        self.max_new_tokens = max_new_tokens
        self.n_threads, self.n_ubatch = n_threads, n_ubatch
        self.on_token = on_token
        self.fixed_prefix = fixed_prefix or []
        self.state_cache = state_cache
        self._ctx: LlamaContext | None = None
        self._cached: list[int] = []

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    def __enter__(self) -> "GreedyGenerator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _context_for(self, n_prompt: int) -> LlamaContext:
        need = n_prompt + self.max_new_tokens
        if self._ctx is None or self._ctx.n_ctx < need:
            self.close()
            # Room for a longer prompt on a retry, so the context (and its cache) is kept.
            self._ctx = self.model.context(ContextSettings(n_ctx=need + 256, n_ubatch=self.n_ubatch, n_threads=self.n_threads))
            self._cached = []
        return self._ctx

    def __call__(self, user_message: str) -> tuple[str, int]:
        """(the reply decoded without special tokens and stripped, the number of generated tokens)."""
        prompt = self.text.tokenize(chat_prompt(self.text, user_message), special=True)
        ctx = self._context_for(len(prompt))
        shared = 0
        for a, b in zip(self._cached, prompt):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(prompt) - 1)  # evaluate at least one token to get logits
        fixed = self.fixed_prefix
        if fixed and shared < len(fixed) < len(prompt) and prompt[:len(fixed)] == fixed:
            self._start_from_fixed_prefix(ctx)
            shared = len(fixed)
        else:
            ctx.truncate(shared)
        self._decode(ctx, prompt[shared:], last_output=True)
        out: list[int] = []
        while len(out) < self.max_new_tokens:
            token = int(np.argmax(ctx.logits(-1)))
            if token in self.stop_ids:
                break
            out.append(token)
            if self.on_token:
                self.on_token(len(out))
            if len(out) < self.max_new_tokens:
                ctx.decode([token])
        self._cached = prompt + out[:ctx.n_past - len(prompt)]
        return self.text.detokenize(out).strip(), len(out)

    def _decode(self, ctx: LlamaContext, tokens: list[int], last_output: bool) -> None:
        for s in range(0, len(tokens), self.n_ubatch):
            end = min(s + self.n_ubatch, len(tokens))
            ctx.decode(tokens[s:end], outputs="last" if last_output and end == len(tokens) else "none")

    def _start_from_fixed_prefix(self, ctx: LlamaContext) -> None:
        fixed = self.fixed_prefix
        ctx.truncate(0)
        blob = self.state_cache.load(fixed) if self.state_cache else None
        if blob is not None and ctx.load_state(blob, len(fixed)):
            log.info("pseudo compiler: %d prompt tokens restored from %s", len(fixed), self.state_cache.path(fixed))
            return
        self._decode(ctx, fixed, last_output=False)
        if self.state_cache:
            self.state_cache.save(fixed, ctx.state())
