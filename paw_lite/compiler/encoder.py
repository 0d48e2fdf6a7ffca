"""The encoder pass (the paper, arXiv 2607.02512, and the public reimplementation avra-m3/program-as-weights-server): the trained compiler reads spec + pseudo-program + the
prefix tokens; the hidden states of depth-matched layers at the prefix positions feed the mapper."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..errors import InvalidFileError
from .llama import ContextSettings, LayerCapture, LlamaModel
from .prompts import minimal_prompt, render_chat

log = logging.getLogger("paw_lite.compiler")

EOS_TEXT = "<|im_end|>"  # the trained compiler's end-of-turn token closes the pseudo-program (§2.2)


class TextModel(Protocol):
    """What the compiler needs of a tokenizer: `LlamaModel` (the GGUF's vocabulary) or `HFTokenizer`."""

    path: object

    def chat_template(self) -> str | None: ...
    def special_token_texts(self) -> dict[str, str]: ...
    def tokenize(self, text: str, *, special: bool) -> list[int]: ...
    def single_token(self, text: str) -> int: ...
    def detokenize(self, ids: list[int]) -> str: ...


def prefix_token_texts(n: int) -> list[str]:
    return [f"<prefix_{k}>" for k in range(1, n + 1)]


def chat_prompt(text: TextModel, user_message: str) -> str:
    """One user message through the model's own chat template, with the generation prompt."""
    template = text.chat_template()
    if not template:
        raise InvalidFileError(f"{text.path}: holds no chat template (tokenizer.chat_template); the compiler prompts need the model's own")
    return render_chat(template, [{"role": "user", "content": user_message}], add_generation_prompt=True,
                       special_tokens=text.special_token_texts(), source=str(text.path))


def encoder_token_ids(text: TextModel, spec: str, pseudo_program: str, prefix_steps: int) -> list[int]:
    """chat(minimal(spec)) + tokens(pseudo_program) + [<|im_end|>] + [<prefix_1> .. <prefix_P>]."""
    eos = text.single_token(EOS_TEXT)
    declared = text.special_token_texts().get("eos_token")
    if declared is not None and declared != EOS_TEXT:
        log.warning("%s declares eos %r; the encoder sequence uses %s as the published compiler does", text.path, declared, EOS_TEXT)
    prefix = [text.single_token(t) for t in prefix_token_texts(prefix_steps)]
    return (text.tokenize(chat_prompt(text, minimal_prompt(spec)), special=True)
            + text.tokenize(pseudo_program, special=True) + [eos] + prefix)


def depth_layers(n_compiler_layers: int, n_interpreter_layers: int) -> list[int]:
    """Compiler layer read for each interpreter layer l: t(l) = int((l+1) * Lc / Li) - 1, clamped
    (Lc = 36: Li = 12 gives 2, 5, 8, ..., 35 for Compact programs; Li = 28 gives 0, 1, 2, 4, ..., 35
    for Standard ones). Computed exactly in integers; the public reimplementation's
    depth_ratio_layers (mapper.py) takes Lc / Li first in floating point, which gives the same
    layers for both published pairs but can differ by one for others (15 / 11)."""
    return [min(max((l + 1) * n_compiler_layers // n_interpreter_layers - 1, 0), n_compiler_layers - 1)
            for l in range(n_interpreter_layers)]


def hidden_states(model: LlamaModel, ids: list[int], layers: list[int], n_last: int, *,
                  n_ubatch: int = 512, n_threads: int | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """(len(layers), n_last, n_embd) float32: the output of decoder block t at the last n_last
    positions for each t in layers (transformers' `hidden_states[t + 1]`); the last block is read
    after the final norm (`hidden_states[-1]`), from llama.cpp's embeddings.

    The positions before the last n_last are evaluated without any output; the last n_last are
    evaluated with embeddings on and the layer callback active, in chunks of n_ubatch, each chunk
    one graph whose rows are the chunk's positions in order.

    on_progress(done, total): called as each layer of each chunk is evaluated, in token-layers
    (total = len(ids) * n_layer): one evaluation of a few hundred tokens takes ~30 s on a 4B model."""
    n = len(ids)
    if not 0 < n_last <= n:
        raise ValueError(f"cannot read the last {n_last} positions of {n} tokens")
    final = model.n_layer - 1
    bad = [t for t in layers if not 0 <= t <= final]
    if bad:
        raise ValueError(f"layers {bad} are outside 0..{final}")
    inner = sorted({t for t in layers if t != final})
    total = n * model.n_layer
    chunk = [0, 0]  # first position and length of the chunk being evaluated

    def layer_done(i: int) -> None:
        on_progress(chunk[0] * model.n_layer + chunk[1] * (i + 1), total)

    capture = LayerCapture(inner, model.n_embd, model.n_layer, layer_done if on_progress is not None else None)
    rows = {t: np.empty((n_last, model.n_embd), dtype=np.float32) for t in set(layers)}
    n_ubatch = min(n_ubatch, n)
    settings = ContextSettings(n_ctx=n, n_ubatch=n_ubatch, n_threads=n_threads, embeddings=True,
                               f32_kv_cache=True, flash_attn=False)
    start = n - n_last
    with model.context(settings, capture) as ctx:
        ctx.set_embeddings(False)  # the positions before the prefix need no output at all
        for s in range(0, start, n_ubatch):
            chunk[:] = s, min(n_ubatch, start - s)
            ctx.decode(ids[s:s + chunk[1]], outputs="none")
            capture.check()
            if on_progress is not None:  # the last layer's output may be skipped for rows nobody reads
                on_progress((s + chunk[1]) * model.n_layer, total)
        ctx.set_embeddings(True)
        capture.active = True
        for s in range(start, n, n_ubatch):
            part = ids[s:min(s + n_ubatch, n)]
            chunk[:] = s, len(part)
            ctx.decode(part, outputs="all")
            got = capture.take()
            at = slice(s - start, s - start + len(part))
            for t in inner:
                if t not in got or got[t].shape[0] != len(part):
                    shape = None if t not in got else got[t].shape
                    raise InvalidFileError(f"{model.path}: llama.cpp gave layer output l_out-{t} with shape {shape} for a chunk of {len(part)} tokens")
                rows[t][at] = got[t]
            if final in rows:
                rows[final][at] = np.stack([ctx.embeddings(i) for i in range(len(part))])
            if on_progress is not None:
                on_progress((s + len(part)) * model.n_layer, total)
    return np.stack([rows[t] for t in layers])
