"""Which tokens each evaluation step holds: the sequences in flight in a cache's slots, their
prompts fed in chunks, greedy decoding until EOS or each sequence's limit, and a finished
sequence's slot handed to the next waiting one. No arithmetic here: a step is evaluated by a
`PackedForward` (`gpt2_packed.GPT2Packed`, `qwen3_packed.Qwen3Packed`: a model family is a
forward over the same scheduler)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .kv_cache import KVShape, SlotCache, Step

if TYPE_CHECKING:
    from .constraints import ConstraintState

# Tokens evaluated in one prefill step across all sequences: bounds the activation buffers
# (MAX_ROWS x n_ff floats) while keeping the matmuls large enough to run at full speed.
MAX_ROWS = 2048
# Query tokens of one sequence per step: bounds the attention score buffer (heads x CHUNK x context).
PREFILL_CHUNK = 512
KV_GROWTH = 64  # own positions reserved past the longest prompt before the KV buffers grow

# What ends an output: one token id (GPT-2's <|endoftext|>) or several (Qwen3 ends on <|im_end|>
# or <|endoftext|>). An empty collection, or an id outside the vocabulary, never ends one.
EOS = int | Collection[int]


def eos_ids(eos: EOS) -> frozenset[int]:
    """The token ids that end an output."""
    if isinstance(eos, (int, np.integer)):
        return frozenset((int(eos),))
    return frozenset(int(t) for t in eos)


class Stopped(Exception):
    """Generation was asked to stop (another worker failed or was interrupted)."""


@dataclass(frozen=True)
class Sequence:
    """One prompt to continue: `ids` are its tokens after the first `start` tokens of the shared
    prefix (the prompt is prefix[:start] + ids), `limit` the most tokens to generate (>= 1).
    `constraint`, when given, restricts every pick (`constraints.ConstraintState`; it is this
    sequence's own and is advanced as tokens are made)."""

    ids: list[int]
    start: int
    limit: int
    constraint: ConstraintState | None = field(default=None, compare=False)


class PackedForward(Protocol):
    """A model's forward over the packed rows of a step (what the scheduler needs of a model)."""

    config: object  # the model's hyperparameters
    kv_shape: KVShape
    n_vocab: int
    map_kv_budget: int | None  # bytes of keys and values a map may hold at most; None: fn.map's own budget
    max_step_rows: int | None  # rows one step evaluates at most (its activation buffers); None: MAX_ROWS

    def fork(self) -> "PackedForward":
        """The same weights with buffers of its own, for another thread."""

    def forward(self, cache: SlotCache, step: Step, tokens: np.ndarray, wanted: np.ndarray) -> np.ndarray | None:
        """Final hidden rows after the last token of each wanted segment, or None if none is wanted."""

    def logits(self, h: np.ndarray) -> np.ndarray: ...

    def greedy(self, h: np.ndarray) -> list[int]: ...

    def greedy_among(self, h: np.ndarray, allowed: list[np.ndarray | None]) -> list[int]:
        """The argmax per row of `logits(h)` among the ids `allowed[row]` (sorted; None: all)."""


def own_positions(seqs: list[Sequence]) -> int:
    """Own positions per slot a batch's key and value buffers start with: room for the prompts and
    a first stretch of output, grown on demand (`SlotCache.reserve`), so a batch run "until EOS or
    the context end" does not reserve the whole context for every sequence."""
    need = max(len(s.ids) + s.limit - 1 for s in seqs)  # the last generated token is never evaluated
    return min(need, max(len(s.ids) for s in seqs) + KV_GROWTH)


def prefill(model: PackedForward, cache: SlotCache, ids: list[int]) -> None:
    """Evaluate ids into slot 0 of the cache, PREFILL_CHUNK tokens a step, no logits."""
    for first in range(0, len(ids), PREFILL_CHUNK):
        n = min(PREFILL_CHUNK, len(ids) - first)
        model.forward(cache, Step(np.array([0]), np.array([first]), np.array([n])), np.asarray(ids[first:first + n]),
                      np.zeros(1, bool))


def run(model: PackedForward, cache: SlotCache, seqs: list[Sequence], eos: EOS,
        first_logits: np.ndarray | None = None, on_tokens: Callable[[int], None] | None = None,
        stop: threading.Event | None = None,
        on_done: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
    """Greedy continuations of every sequence, each stopping at EOS (any of the ids `eos` gives) or
    its limit, taking turns in the cache's slots (a `Batch` given them all at once and stepped
    until it is empty).
    on_tokens(n) after each step that made n tokens; on_done(i, ids) as sequence i finishes; once
    `stop` is set, the next step raises Stopped instead of running. With first_logits
    (n_seqs, n_vocab), also the logits each sequence's first token came from."""
    outs: list[list[int]] = [[] for _ in seqs]

    def finished(i: int, ids: list[int]) -> None:
        outs[i] = ids
        if on_done is not None:
            on_done(i, ids)

    batch = Batch(model, cache, eos, first_logits=first_logits, on_done=finished)
    for i, seq in enumerate(seqs):
        batch.add(i, seq)
    while batch.busy:
        if stop is not None and stop.is_set():
            raise Stopped
        made = sum(len(new) for _, new in batch.step())
        if made and on_tokens is not None:
            on_tokens(made)
    return outs


class Batch:
    """Sequences in flight in a cache's slots, stepped one evaluation at a time. Sequences may be
    added (`add`) and dropped (`drop`) between steps: a server feeds requests into a running batch
    as they arrive, and a finished or dropped sequence's slot goes to the next waiting one.

    Each step evaluates one token of every decoding sequence together with prompt tokens of newly
    admitted ones, so when outputs end at different steps the slots stay full and the matmuls
    large. A sequence's constraint restricts each pick to its allowed ids (the head computes only
    those rows when they are few). Tokens it forces are not picked one step each: they join the
    next evaluation as extra rows of the sequence's segment (before the first pick, of its prompt),
    and a sequence whose output is complete and cannot go on ends without another evaluation.

    Keys name the sequences (any hashable: an index, a request); on_done(key, ids) as each ends.
    With first_logits, keys are row indices into it and the logits each first token came from are
    written there.

    max_slots: the cache gains slots (doubling) while sequences wait and it holds fewer than this
    (None: the cache's slots are all). kv_budget: a waiting sequence is admitted only while the
    cache, grown for it (slots x own positions of the longest prompt), stays within this many
    bytes, unless nothing is in flight (None: no budget)."""

    def __init__(self, model: PackedForward, cache: SlotCache, eos: EOS, *, first_logits: np.ndarray | None = None,
                 on_done: Callable[[Hashable, list[int]], None] | None = None, max_slots: int | None = None,
                 kv_budget: int | None = None):
        self.model, self.cache, self.ends = model, cache, eos_ids(eos)
        self.max_slots = cache.n_slots if max_slots is None else max(max_slots, cache.n_slots)
        self.kv_budget = kv_budget
        self.first_logits = first_logits
        self.on_done = on_done
        self.seqs: dict[Hashable, Sequence] = {}
        self.outs: dict[Hashable, list[int]] = {}
        self.prompts: dict[Hashable, list[int]] = {}  # what each sequence evaluates before its first pick
        self.waiting: deque[Hashable] = deque()
        self.free: deque[int] = deque(range(cache.n_slots))
        self.slot_of: dict[Hashable, int] = {}
        self.fed: dict[Hashable, int] = {}  # prompt tokens evaluated, per admitted sequence still in its prompt
        # sequence -> (next tokens to evaluate, own index of the first)
        self.decoding: dict[Hashable, tuple[list[int], int]] = {}

    @property
    def busy(self) -> bool:
        """Whether any sequence is waiting or in flight."""
        return bool(self.waiting or self.fed or self.decoding)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, key: Hashable, seq: Sequence) -> None:
        """Queue a sequence: it takes the next free slot. One that needs no evaluation (its
        constraint forces a complete output) ends here, on_done included."""
        if key in self.seqs:
            raise ValueError(f"sequence {key!r} is already in the batch")
        self.seqs[key] = seq
        self.outs[key] = seq.constraint.take_forced(seq.limit) if seq.constraint is not None else []
        self.prompts[key] = seq.ids + self.outs[key]
        if _ended(seq, self.outs[key]):
            self._finish(key)
        else:
            self.waiting.append(key)

    def drop(self, key: Hashable) -> None:
        """Take a sequence out (its caller went away): its slot is free for the next one, and
        on_done is not called. A key no longer in the batch is ignored."""
        if key not in self.seqs:
            return
        if key in self.slot_of:
            self.free.append(self.slot_of[key])
        else:
            self.waiting.remove(key)
        self._forget(key)

    def step(self) -> list[tuple[Hashable, list[int]]]:
        """One evaluation: the (key, new tokens) of every sequence that made tokens in it."""
        seqs, cache, prompts, fed, decoding = self.seqs, self.cache, self.prompts, self.fed, self.decoding
        if not self.busy:
            return []
        while self.waiting and self._room_for(self.waiting[0]):
            i = self.waiting.popleft()
            self.slot_of[i] = self.free.popleft()
            fed[i] = 0
            cache.assign(self.slot_of[i], seqs[i].start)
        slot_of = self.slot_of
        # Decoding sequences first: their one-token segments form one attention group.
        segments = [(i, slot_of[i], index, tokens) for i, (tokens, index) in decoding.items()]
        rows = sum(len(sg[3]) for sg in segments)
        total = rows + sum(len(prompts[i]) - done for i, done in fed.items())
        limit = self.model.max_step_rows or MAX_ROWS
        budget = -(-total // -(-total // limit))  # even steps: 2368 rows go as 2 x 1184, not 2048 + 320
        for i, done in fed.items():
            n = min(PREFILL_CHUNK, len(prompts[i]) - done, budget - rows)
            if n <= 0:
                break
            segments.append((i, slot_of[i], int(cache.base[slot_of[i]]) + done, prompts[i][done:done + n]))
            rows += n
        step = Step(np.array([sg[1] for sg in segments]), np.array([sg[2] for sg in segments]),
                    np.array([len(sg[3]) for sg in segments]))
        wants = np.array([i not in fed or fed[i] + len(ids) == len(prompts[i]) for i, _, _, ids in segments])
        cache.reserve(int((step.first + step.count).max()))
        h = self.model.forward(cache, step, np.concatenate([sg[3] for sg in segments]), wants)
        constraints = [seqs[sg[0]].constraint for sg, want in zip(segments, wants) if want]
        if h is None:
            logits, picks = None, []
        elif self.first_logits is not None:
            logits = self.model.logits(h)
            picks = np.argmax(logits, axis=1).tolist()
        elif any(c is not None for c in constraints):
            logits, picks = None, self.model.greedy_among(h, [None if c is None else c.allowed() for c in constraints])
        else:
            logits, picks = None, self.model.greedy(h)
        row = 0  # logits row of the next segment that wants one
        made: list[tuple[Hashable, list[int]]] = []
        for (i, slot, first, ids), want in zip(segments, wants):
            if not want:
                fed[i] += len(ids)
                continue
            if fed.pop(i, None) is not None and self.first_logits is not None:
                self.first_logits[i] = logits[row]
            token = picks[row]
            row += 1
            seq, out, new = seqs[i], self.outs[i], []
            if token not in self.ends:
                new.append(token)
                if seq.constraint is not None:
                    seq.constraint.advance(token)
                    new += seq.constraint.take_forced(seq.limit - len(out) - 1)
                out += new
                made.append((i, new))
            if token in self.ends or _ended(seq, out):
                decoding.pop(i, None)
                self.free.append(slot)
                self._finish(i)
            else:
                decoding[i] = (new, first + len(ids))
        return made

    def _room_for(self, key: Hashable) -> bool:
        """Whether the next waiting sequence can take a slot now (adding slots if allowed)."""
        cache = self.cache
        in_flight = len(self.slot_of)
        if self.kv_budget is not None and in_flight:
            slots = cache.n_slots if self.free else min(2 * cache.n_slots, self.max_slots)
            positions = max(cache.k.shape[3], len(self.prompts[key]))
            if slots * positions * self.model.kv_shape.bytes_per_position > self.kv_budget:
                return False
        if not self.free and cache.n_slots < self.max_slots:
            first = cache.n_slots
            cache.add_slots(min(first, self.max_slots - first))
            self.free.extend(range(first, cache.n_slots))
        return bool(self.free)

    def _finish(self, key: Hashable) -> None:
        ids = self.outs[key]
        self._forget(key)
        if self.on_done is not None:
            self.on_done(key, ids)

    def _forget(self, key: Hashable) -> None:
        for table in (self.seqs, self.outs, self.prompts, self.slot_of, self.fed, self.decoding):
            table.pop(key, None)


def _ended(seq: Sequence, out: list[int]) -> bool:
    """The sequence made all it may, or its output is complete and cannot go on."""
    return len(out) >= seq.limit or (seq.constraint is not None and seq.constraint.finished)
