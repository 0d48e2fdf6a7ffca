"""scheduler.Batch, the steppable batch a server feeds: sequences that join a running batch, leave
it, or wait for room give the outputs they give alone (`fn(text)`), with and without constraints."""

from __future__ import annotations

import numpy as np
import pytest

import paw_lite
from paw_lite.kv_cache import SlotCache

TEXTS = ["disk usage at 99% on /var", "user logged in", "ünïcödé ✓", "kernel panic - not syncing", "", "cpu 100%"]


@pytest.fixture(scope="module")
def fn(tiny_program, tiny_gguf, tmp_path_factory):
    f = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path_factory.mktemp("cache"))
    yield f
    f.close()


def _run(fn, arrivals: dict[int, list[tuple[str, dict]]], capacity: int, kv_budget=None, drop_at=None):
    """Step a batch, adding arrivals[step] before that step; returns {key: ids} and the slots used."""
    done = {}
    with fn.engine() as engine:
        batch = engine.batch(capacity, fn.tokenizer.eos_id, on_done=lambda k, ids: done.__setitem__(k, ids),
                             kv_budget=kv_budget)
        step = 0
        while step <= max(arrivals) or batch.busy:
            for key, kwargs in arrivals.get(step, []):
                call = fn.prepare(key, **kwargs)
                batch.add(key, call.sequence)
            if drop_at is not None and step == drop_at[0]:
                batch.drop(drop_at[1])
            batch.step()
            step += 1
        return done, batch.cache.n_slots


def test_sequences_joining_a_running_batch_get_their_own_outputs(fn):
    arrivals = {0: [(TEXTS[0], {"max_tokens": 20})], 2: [(TEXTS[1], {"max_tokens": 9}), (TEXTS[2], {"max_tokens": 20})],
                5: [(t, {"max_tokens": 12}) for t in TEXTS[3:]]}
    done, slots = _run(fn, arrivals, capacity=8)
    for kwargs_list in arrivals.values():
        for text, kwargs in kwargs_list:
            assert fn.tokenizer.decode(done[text]).strip() == fn(text, **kwargs)
    assert slots <= 8


def test_constrained_sequences_join_too(fn):
    choices = {"choices": ["ALERT", "QUIET"], "max_tokens": 10}
    arrivals = {0: [(TEXTS[0], {"max_tokens": 15})], 1: [(TEXTS[1], choices), (TEXTS[3], choices)]}
    done, _ = _run(fn, arrivals, capacity=4)
    assert fn.tokenizer.decode(done[TEXTS[1]]).strip() == fn(TEXTS[1], **choices)
    assert fn.tokenizer.decode(done[TEXTS[3]]).strip() == fn(TEXTS[3], **choices)
    assert fn.tokenizer.decode(done[TEXTS[0]]).strip() == fn(TEXTS[0], 15)


def test_capacity_bounds_the_slots_and_the_rest_wait(fn):
    arrivals = {0: [(t, {"max_tokens": 6}) for t in TEXTS]}
    done, slots = _run(fn, arrivals, capacity=2)
    assert slots == 2
    assert {t: fn.tokenizer.decode(ids).strip() for t, ids in done.items()} == {t: fn(t, 6) for t in TEXTS}


def test_a_kv_budget_admits_one_sequence_at_a_time(fn):
    arrivals = {0: [(t, {"max_tokens": 6}) for t in TEXTS[:3]]}
    done, slots = _run(fn, arrivals, capacity=8, kv_budget=1)  # below one slot: only an empty batch admits
    assert slots == 1
    assert {t: fn.tokenizer.decode(ids).strip() for t, ids in done.items()} == {t: fn(t, 6) for t in TEXTS[:3]}


def test_a_dropped_sequence_leaves_without_on_done_and_frees_its_slot(fn):
    assert len(fn.generate_ids(TEXTS[0], 20)) >= 3
    arrivals = {0: [(TEXTS[0], {"max_tokens": 20})], 3: [(TEXTS[1], {"max_tokens": 8})]}
    done, slots = _run(fn, arrivals, capacity=1, drop_at=(2, TEXTS[0]))
    assert set(done) == {TEXTS[1]} and slots == 1  # the second took the freed slot
    assert fn.tokenizer.decode(done[TEXTS[1]]).strip() == fn(TEXTS[1], 8)


def test_a_key_is_added_once(fn):
    call = fn.prepare("x", 3)
    with fn.engine() as engine:
        batch = engine.batch(2, fn.tokenizer.eos_id)
        batch.add("a", call.sequence)
        with pytest.raises(ValueError, match="already"):
            batch.add("a", call.sequence)
        batch.drop("never added")  # ignored


def test_add_slots_keeps_what_the_slots_hold():
    k = np.arange(2 * 3 * 2 * 4 * 5, dtype=np.float32).reshape(2, 3, 2, 4, 5)
    cache = SlotCache(k.copy(), -k.copy(), k[:, :, 0, :0], k[:, :, 0, :0])
    cache.start[:] = [1, 2]
    cache.add_slots(3)
    assert cache.k.shape == (2, 3, 5, 4, 5) and cache.start.tolist() == [1, 2, 0, 0, 0]
    assert np.array_equal(cache.k[:, :, :2], k) and np.array_equal(cache.v[:, :, :2], -k)
    assert not cache.k[:, :, 2:].any()
