"""Which tokens each evaluation step holds: the sequences in flight in a cache's slots, their
prompts fed in chunks, greedy decoding until EOS or each sequence's limit, and a finished
sequence's slot handed to the next waiting one. No arithmetic here: a step is evaluated by a
`PackedForward` (`gpt2_packed.GPT2Packed`, `qwen3_packed.Qwen3Packed`: a model family is a
forward over the same scheduler)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection
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
_KV_GROWTH = 64  # own positions reserved past the longest prompt before the KV buffers grow

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
    return min(need, max(len(s.ids) for s in seqs) + _KV_GROWTH)


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
    its limit, taking turns in
    the cache's slots. Each step evaluates one token of every decoding sequence together with
    prompt tokens of newly admitted ones, so when outputs end at different steps the slots stay
    full and the matmuls large. on_tokens(n) after each step that made n tokens; on_done(i, ids)
    as sequence i finishes; once `stop` is set, the next step raises Stopped instead of running.
    With first_logits (n_seqs, n_vocab), also the logits each sequence's first token came from.

    A sequence's constraint restricts each pick to its allowed ids (the head computes only those
    rows when they are few). Tokens it forces are not picked one step each: they join the next
    evaluation as extra rows of the sequence's segment (before the first pick, of its prompt), and
    a sequence whose output is complete and cannot go on ends without another evaluation."""
    ends = eos_ids(eos)
    outs: list[list[int]] = [[] for _ in seqs]
    prompts: list[list[int]] = []  # what each sequence evaluates before its first pick
    waiting: deque[int] = deque()
    for i, seq in enumerate(seqs):
        if seq.constraint is not None:
            outs[i] = seq.constraint.take_forced(seq.limit)
        prompts.append(seq.ids + outs[i])
        if _ended(seq, outs[i]):
            if on_done is not None:
                on_done(i, outs[i])
        else:
            waiting.append(i)
    free = deque(range(cache.n_slots))
    slot_of: dict[int, int] = {}
    fed: dict[int, int] = {}  # prompt tokens evaluated, per admitted sequence still in its prompt
    decoding: dict[int, tuple[list[int], int]] = {}  # sequence -> (next tokens to evaluate, own index of the first)
    while waiting or fed or decoding:
        if stop is not None and stop.is_set():
            raise Stopped
        while waiting and free:
            i = waiting.popleft()
            slot_of[i] = free.popleft()
            fed[i] = 0
            cache.assign(slot_of[i], seqs[i].start)
        # Decoding sequences first: their one-token segments form one attention group.
        segments = [(i, slot_of[i], index, tokens) for i, (tokens, index) in decoding.items()]
        rows = sum(len(sg[3]) for sg in segments)
        total = rows + sum(len(prompts[i]) - done for i, done in fed.items())
        budget = -(-total // -(-total // MAX_ROWS))  # even steps: 2368 rows go as 2 x 1184, not 2048 + 320
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
        h = model.forward(cache, step, np.concatenate([sg[3] for sg in segments]), wants)
        constraints = [seqs[sg[0]].constraint for sg, want in zip(segments, wants) if want]
        if h is None:
            logits, picks = None, []
        elif first_logits is not None:
            logits = model.logits(h)
            picks = np.argmax(logits, axis=1).tolist()
        elif any(c is not None for c in constraints):
            logits, picks = None, model.greedy_among(h, [None if c is None else c.allowed() for c in constraints])
        else:
            logits, picks = None, model.greedy(h)
        row = made = 0  # logits row of the next segment that wants one; tokens this step made
        for (i, slot, first, ids), want in zip(segments, wants):
            if not want:
                fed[i] += len(ids)
                continue
            if fed.pop(i, None) is not None and first_logits is not None:
                first_logits[i] = logits[row]
            token = picks[row]
            row += 1
            seq, new = seqs[i], []
            if token not in ends:
                new.append(token)
                if seq.constraint is not None:
                    seq.constraint.advance(token)
                    new += seq.constraint.take_forced(seq.limit - len(outs[i]) - 1)
                outs[i] += new
                made += len(new)
            if token in ends or _ended(seq, outs[i]):
                decoding.pop(i, None)
                free.append(slot)
                if on_done is not None:
                    on_done(i, outs[i])
            else:
                decoding[i] = (new, first + len(ids))
        if made and on_tokens is not None:
            on_tokens(made)
    return outs


def _ended(seq: Sequence, out: list[int]) -> bool:
    """The sequence made all it may, or its output is complete and cannot go on."""
    return len(out) >= seq.limit or (seq.constraint is not None and seq.constraint.finished)
