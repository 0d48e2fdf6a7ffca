"""The fast path the runtime uses, for GPT-2 and Qwen3 alike: a program's prefix evaluated once and
shared by every call, and ragged batches of sequences evaluated together. Where each part lives:

- `gpt2_weights.py` / `qwen3_weights.py`: the weights, LoRA merged in (the form the references
  `gpt2.py` / `qwen3.py` run on too);
- `gpt2_packed.py` / `qwen3_packed.py`: the forward over the packed rows of a step (embed -> blocks -> head);
- `attention.py`: which keys each row attends to, and the attention itself;
- `kv_cache.py`: the slots keys and values live in;
- `scheduler.py`: which tokens each step holds, EOS, limits, slots taken in turn.

`Engine` puts them together for one program: it holds the prefix's keys and values, checks what
it is asked to generate, and picks the cache (a call alone copies the prefix in front of its own
keys; a batch reads it in place)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import replace

import numpy as np

from . import scheduler
from .errors import ContextOverflowError, InvalidInputError
from .gpt2_layout import GPT2Config
from .gpt2_packed import GPT2Packed
from .gpt2_weights import Weights
from .kv_cache import SlotCache, SoloCache
from .qwen3_layout import Qwen3Config
from .qwen3_packed import Qwen3Packed
from .qwen3_weights import Qwen3Weights
from .scheduler import EOS, Sequence, Stopped, own_positions

__all__ = ["Engine", "Sequence", "Stopped", "own_positions"]


class Engine:
    """Evaluates a model over one shared prefix plus, per sequence, its own tokens. Not for
    concurrent use: `fork` gives another thread its own buffers. Nothing here is a family's but
    the constructors `gpt2` and `qwen3`: a family is a `scheduler.PackedForward`."""

    def __init__(self, model: scheduler.PackedForward):
        self.model = model
        self.config = model.config
        self.n_ctx, self.n_vocab = model.kv_shape.n_ctx, model.n_vocab
        self.prefix_k = self.prefix_v = model.kv_shape.empty_prefix()
        self._solo: SoloCache | None = None

    @classmethod
    def gpt2(cls, weights: Weights, config: GPT2Config) -> "Engine":
        return cls(GPT2Packed(weights, config))

    @classmethod
    def qwen3(cls, weights: Qwen3Weights, config: Qwen3Config) -> "Engine":
        return cls(Qwen3Packed(weights, config))

    @property
    def w(self) -> Weights | Qwen3Weights:
        """The weights the engine runs on (`Weights` for GPT-2, `Qwen3Weights` for Qwen3)."""
        return self.model.w

    def fork(self) -> "Engine":
        """An engine over the same weights and prefix with its own buffers, for another thread."""
        twin = Engine(self.model.fork())
        twin.set_prefix(self.prefix_k, self.prefix_v)
        return twin

    def release_solo_cache(self) -> None:
        """Free the single call's cache before a map: it holds a copy of the prefix and the longest
        call's positions (~180 MB after a 550-token Qwen3-0.6B call), and the map's slot caches are
        about to take their own. The next single call makes it again (a cheap allocation)."""
        self._solo = None

    # -- prefix -------------------------------------------------------------------------------

    def set_prefix(self, k: np.ndarray, v: np.ndarray) -> None:
        """Keys and values of the shared prefix: (n_layer, n_head_kv, P, head_dim) each (`kv_shape`)."""
        self.prefix_k, self.prefix_v = k, v
        self._solo = None

    def eval_prefix(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate a prefix from scratch (no logits needed) and return its keys and values."""
        empty = self.model.kv_shape.empty_prefix()
        if not ids:
            return empty, empty.copy()  # two arrays: callers may write to either
        self._check_ids(ids, len(ids), "the prefix")
        cache = SlotCache.slots(self.model.kv_shape, 1, len(ids), empty, empty)
        cache.assign(0, 0)
        scheduler.prefill(self.model, cache, ids)
        return cache.k[:, :, 0].copy(), cache.v[:, :, 0].copy()

    # -- generation ---------------------------------------------------------------------------

    def generate(self, seqs: list[Sequence], eos: EOS, capacity: int | None = None,
                 on_tokens: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None,
                 on_done: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
        """Greedy continuations of every sequence, each stopping at EOS (a token id, or a collection
        of ids any of which ends an output: Qwen3's <|im_end|> and <|endoftext|>) or its limit; on_tokens is
        called after each step that made tokens, with how many it made (for progress), and
        on_done(i, ids) as sequence i finishes. Once `stop` is set, the next step raises Stopped
        instead of running. Up to `capacity` sequences (all by default) are in flight, a finished
        one's slot going to the next (`scheduler.run`)."""
        return self._run(seqs, eos, capacity, on_tokens=on_tokens, stop=stop, on_done=on_done)

    def batch(self, capacity: int, eos: EOS, on_done: Callable[[Hashable, list[int]], None] | None = None,
              kv_budget: int | None = None) -> scheduler.Batch:
        """An open batch of up to `capacity` sequences in flight that sequences join (`add`, after
        `check`) and leave between steps: a server's continuous batching. Its cache starts with one
        slot of KV_GROWTH own positions and grows with what joins (slots) and what they make
        (positions), within kv_budget bytes (`scheduler.Batch`)."""
        cache = SlotCache.slots(self.model.kv_shape, 1, scheduler.KV_GROWTH, self.prefix_k, self.prefix_v)
        return scheduler.Batch(self.model, cache, eos, on_done=on_done, max_slots=capacity, kv_budget=kv_budget)

    def check(self, seq: Sequence, what: str = "the sequence") -> None:
        """Refuse, with a PawError, a sequence this engine cannot run (as generate does)."""
        self._check(seq, what)

    def prompt_logits(self, seqs: list[Sequence]) -> np.ndarray:
        """Logits after the last token of each sequence (n_seqs, n_vocab): what generation
        chooses each one's first token from, evaluated the way generation evaluates them."""
        logits = np.empty((len(seqs), self.n_vocab), np.float32)
        self._run([replace(s, limit=1) for s in seqs], (), None, first_logits=logits)
        return logits

    def _run(self, seqs: list[Sequence], eos: EOS, capacity: int | None,
             first_logits: np.ndarray | None = None, **callbacks) -> list[list[int]]:
        if not seqs:
            return []
        for n, seq in enumerate(seqs):
            self._check(seq, f"sequence {n}")
        capacity = max(1, min(capacity or len(seqs), len(seqs)))
        if len(seqs) == 1:
            if self._solo is None:
                self._solo = SoloCache(self.model.kv_shape)
            seq = seqs[0]
            # the last generated token is never evaluated
            cache = self._solo.cache_for(seq.start, seq.start + len(seq.ids) + seq.limit - 1, self.prefix_k, self.prefix_v)
        else:
            cache = SlotCache.slots(self.model.kv_shape, capacity, own_positions(seqs), self.prefix_k, self.prefix_v)
        return scheduler.run(self.model, cache, seqs, eos, first_logits, **callbacks)

    def _check(self, seq: Sequence, what: str) -> None:
        """A sequence the engine can run: real errors, not asserts (they vanish under python -O)."""
        if not isinstance(seq.limit, (int, np.integer)) or seq.limit < 1:
            raise InvalidInputError(f"{what}: limit is {seq.limit!r}, expected at least 1 token to generate")
        P = self.prefix_k.shape[2]
        if not isinstance(seq.start, (int, np.integer)) or not 0 <= seq.start <= P:
            raise InvalidInputError(f"{what}: start is {seq.start!r}, expected 0..{P} (the prefix holds {P} tokens)")
        if not seq.ids:
            raise InvalidInputError(f"{what}: no tokens after the prefix part; at least one is evaluated "
                                    f"for the logits of the first output")
        end = seq.start + len(seq.ids) + seq.limit - 1
        if end > self.n_ctx:
            raise ContextOverflowError(f"{what}: {seq.start} prefix tokens + {len(seq.ids)} tokens + {seq.limit} to "
                                       f"generate need {end} positions; the context holds {self.n_ctx}")
        self._check_ids(seq.ids, len(seq.ids), what)

    def _check_ids(self, ids: list[int], n: int, what: str) -> None:
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu" or arr.shape != (n,):
            raise InvalidInputError(f"{what}: token ids must be a flat list of integers")
        if n > self.n_ctx:
            raise ContextOverflowError(f"{what} is {n} tokens; the context holds {self.n_ctx}")
        bad = (arr < 0) | (arr >= self.n_vocab)
        if bad.any():
            raise InvalidInputError(f"{what}: token id {int(arr[bad][0])} is outside the vocabulary "
                                    f"(0..{self.n_vocab - 1})")
