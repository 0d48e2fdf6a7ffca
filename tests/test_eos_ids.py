"""Several EOS ids (Qwen3 ends an output on <|im_end|> or <|endoftext|>): the scheduler stops a
sequence at the first of them, batched or alone, whatever collection they come in; a choice
constraint allows every one of them once complete."""

from __future__ import annotations

import numpy as np
import pytest

from paw_lite.base_model import BaseModel
from paw_lite.constraints import ChoiceMatcher, TokenTable
from paw_lite.engine import Engine, Sequence
from paw_lite.gpt2_weights import Weights
from paw_lite.scheduler import eos_ids


@pytest.fixture(scope="module")
def engine_and_seqs(tiny_gguf):
    base = BaseModel.load(tiny_gguf)
    engine = Engine.gpt2(Weights.from_gguf_names(base.weights, base.config), base.config)
    rng = np.random.default_rng(7)
    seqs = [Sequence(rng.integers(0, 50000, size=n).tolist(), 0, 12) for n in (3, 9, 5, 14, 7, 2)]
    return engine, seqs


def _cut(out: list[int], ends: set[int]) -> list[int]:
    for k, t in enumerate(out):
        if t in ends:
            return out[:k]
    return out


def test_an_output_ends_at_the_first_of_several_eos_ids(engine_and_seqs):
    engine, seqs = engine_and_seqs
    free = [engine.generate([s], eos=())[0] for s in seqs]  # no EOS: every output runs to its limit
    assert all(len(o) == 12 for o in free)
    # two tokens that end different outputs at different places
    first = [o[1] for o in free]
    a = max(set(first), key=first.count)
    b = next(o[2] for o in free if a not in o[:3] and o[2] != a)
    want = [_cut(o, {a, b}) for o in free]
    assert want != [_cut(o, {a}) for o in free] and want != [_cut(o, {b}) for o in free], "both ids must matter"
    for eos in ({a, b}, (b, a), [a, b], frozenset({a, b}), np.array([a, b])):
        assert [engine.generate([s], eos=eos)[0] for s in seqs] == want
        assert engine.generate(seqs, eos=eos) == want
        assert engine.generate(seqs, eos=eos, capacity=2) == want
    assert engine.generate(seqs, eos=a) == [_cut(o, {a}) for o in free]  # one id, as before


def test_eos_ids_forms():
    assert eos_ids(5) == eos_ids(np.int64(5)) == frozenset({5})
    assert eos_ids((151645, 151643)) == frozenset({151643, 151645})
    assert eos_ids(()) == frozenset()


def test_a_complete_choice_may_end_on_any_eos_id():
    table = TokenTable([b"a", b"b", b"ab", b"", b""], eos=(3, 4), special={3: "<|im_end|>", 4: "<|endoftext|>"})
    assert table.eos == 3 and table.eos_ids == {3, 4}
    state = ChoiceMatcher(("a", "ab"), table).start()
    state.advance(0)
    assert state.complete and not state.finished
    assert state.allowed().tolist() == [1, 3, 4]
    state.advance(4)
    assert state.finished and state.text() == b"a"
    one = TokenTable([b"a", b""], eos=1, special={1: "<|endoftext|>"})
    assert one.eos == 1 and one.eos_ids == {1}
