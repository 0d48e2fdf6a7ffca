"""`fn.map` evaluates many inputs together against the shared prefix: its token ids must equal
calling the function one input at a time, and both must equal the plain reference forward pass
(gpt2.forward, one token at a time, no prefix sharing).

Batching changes the float32 summation order (packed matmuls, the prefix and each sequence's own
keys as two blocks), so logits are not bit-identical between batch sizes. Measured on these models
(max abs over the TEXTS prompts): batched vs one-at-a-time 4.6e-6 (tiny, |logits| up to 7.2) and
3.5e-6 (mid, up to 3.5); one-at-a-time vs the reference forward pass 6.4e-6 and 2.9e-6; the tests
allow 1e-4. `test_greedy_margins_exceed_batching_noise` checks on the mid-size model that every
chosen token wins by more than 100x that noise, which is why the ids stay identical."""

from __future__ import annotations

import numpy as np
import pytest

import paw_lite
from paw_lite.base_model import BaseModel
from paw_lite.engine import Engine, Sequence
from paw_lite.gpt2 import KVCache, forward
from paw_lite.gpt2_weights import Weights
from paw_lite.lora import LoraAdapter
from paw_lite.products import SMALL_PRODUCT_ROWS
from paw_lite.errors import PawError

from conftest import TEMPLATE, make_hf_gpt2, make_program, random_lora

# Ragged on purpose: empty, one word, long, unicode, leading newline (merges with the prefix's
# last token in BPE, so less of the cached prefix is shared), text that looks like a special token.
TEXTS = ["", "ok", "disk usage at 99% on /var and climbing fast, pager duty notified twice",
         "ünïcödé ✓ ✓", "\n\n\nleading newlines", "a <|endoftext|> b", "user logged in", "x" * 40,
         "kernel panic - not syncing", "  spaced  out  ", "1 2 3 4 5 6 7 8 9 10", "END_INPUT]"]
NOISE_TOL = 1e-4  # the logit parity the interpreter tests state


def reference_greedy(base: BaseModel, weights: dict, ids: list[int], limit: int) -> list[int]:
    """Greedy decoding with the unoptimized path: gpt2.forward over a fresh cache, one token at a time."""
    cache = KVCache(base.config)
    logits = forward(ids, weights, base.config, cache, 0)
    out, pos = [], len(ids)
    while len(out) < limit:
        token = int(np.argmax(logits))
        if token == base.tokenizer.eos_id:
            break
        out.append(token)
        if len(out) == limit:
            break
        logits = forward([token], weights, base.config, cache, pos)
        pos += 1
    return out


@pytest.fixture(scope="module")
def tiny_fn(tiny_program, tiny_gguf, tmp_path_factory):
    with paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path_factory.mktemp("c")) as f:
        yield f


@pytest.fixture(scope="module")
def mid_files(tmp_path_factory, hf_tokenizer_dir):
    """A mid-size random GPT-2 (4 layers, 256 wide, 512 positions, real vocabulary) and a rank-16
    program: logits have realistic spreads, so argmax near-ties are unlikely."""
    from paw_lite.convert.gpt2 import convert_hf_gpt2

    d = tmp_path_factory.mktemp("mid")
    hf = make_hf_gpt2(d / "hf", hf_tokenizer_dir, n_layer=4, n_embd=256, n_head=8, n_ctx=512, seed=3, init_std=0.05)
    gguf = convert_hf_gpt2(hf, d / "mid-f32.gguf", "f32")
    program = make_program(d / "mid.paw", random_lora(4, 256, 16, seed=5, std=0.1), 16.0, "f32")
    return gguf, program


@pytest.fixture(scope="module")
def mid_fn(mid_files, tmp_path_factory):
    gguf, program = mid_files
    with paw_lite.function(program, base_model=gguf, cache_dir=tmp_path_factory.mktemp("c")) as f:
        yield f


def test_map_equals_one_by_one_on_the_tiny_model(tiny_fn):
    one_by_one = [tiny_fn.generate_ids(t) for t in TEXTS]  # until EOS or the context end
    lengths = {len(o) for o in one_by_one}
    assert len(lengths) > 1, "ragged outputs expected"
    for batch_size in (1, 3, 5, 64):
        assert tiny_fn.map_ids(TEXTS, batch_size=batch_size) == one_by_one, batch_size
    assert tiny_fn.map(TEXTS, batch_size=4) == [tiny_fn(t) for t in TEXTS]


@pytest.mark.parametrize("max_tokens", [0, 1, 2, 7])
def test_map_respects_max_tokens(tiny_fn, max_tokens):
    got = tiny_fn.map_ids(TEXTS, max_tokens=max_tokens, batch_size=4)
    assert got == [tiny_fn.generate_ids(t, max_tokens=max_tokens) for t in TEXTS]
    assert all(len(o) <= max_tokens for o in got)


def test_map_stops_each_input_at_the_context_end(tiny_fn, tiny_gguf, tiny_program, tmp_path):
    n_fixed = len(tiny_fn.prompt_ids(""))
    room_for_input = tiny_fn.config.n_ctx - n_fixed - 1
    texts = [" ".join(["word"] * n) for n in (room_for_input, room_for_input - 1, room_for_input - 5, 3)]
    prompts = [tiny_fn.prompt_ids(t) for t in texts]
    assert len(prompts[0]) == tiny_fn.config.n_ctx - 1, "the first input leaves room for exactly one token"
    got = tiny_fn.map_ids(texts, batch_size=4)
    assert got == [tiny_fn.generate_ids(t) for t in texts]
    # the oracle: the reference forward pass, greedy until EOS or the last position of the context
    base = BaseModel.load(tiny_gguf)
    merged = LoraAdapter.from_program(paw_lite.Program.load(tiny_program), base.config).merged_into(base.weights, base.config)
    assert got == [reference_greedy(base, merged, ids, tiny_fn.config.n_ctx - len(ids)) for ids in prompts]
    assert [len(ids) + len(out) for ids, out in zip(prompts, got)][:3] == [tiny_fn.config.n_ctx] * 3, \
        "these inputs must run into the context end (not EOS) for the test to mean anything"


def test_map_errors_before_any_work(tiny_fn):
    with pytest.raises(paw_lite.ContextOverflowError):
        tiny_fn.map(["fine", "word " * 500])
    with pytest.raises(ValueError, match="batch_size"):
        tiny_fn.map(["a"], batch_size=0)
    with pytest.raises(ValueError, match="max_tokens"):
        tiny_fn.map(["a"], max_tokens=-2)
    assert tiny_fn.map([]) == []


def test_engine_equals_the_reference_forward_pass(tiny_fn, tiny_gguf, tiny_program, tmp_path):
    """The fast path (prefix shared, batched) against gpt2.forward with the LoRA merged as lora.py merges it."""
    base = BaseModel.load(tiny_gguf)
    merged = LoraAdapter.from_program(paw_lite.Program.load(tiny_program), base.config).merged_into(base.weights, base.config)
    for text in TEXTS[:6]:
        ids = tiny_fn.prompt_ids(text)
        assert tiny_fn.generate_ids(text, max_tokens=12) == reference_greedy(base, merged, ids, 12), text


def _engine_and_reference(gguf, program, tmp_path):
    base = BaseModel.load(gguf)
    adapter = LoraAdapter.from_program(paw_lite.Program.load(program), base.config)
    merged = adapter.merged_into(base.weights, base.config)
    engine = Engine.gpt2(Weights.from_gguf_names(base.weights, base.config, adapter.pairs, adapter.scale), base.config)
    return base, merged, engine


@pytest.mark.parametrize("model", ["tiny", "mid"])
def test_logits_parity_batched_single_and_reference(model, tiny_gguf, tiny_program, mid_files, tmp_path):
    gguf, program = (tiny_gguf, tiny_program) if model == "tiny" else mid_files
    base, merged, engine = _engine_and_reference(gguf, program, tmp_path)
    tok = base.tokenizer
    prefix, suffix = TEMPLATE.split("{INPUT_PLACEHOLDER}")
    prefix_ids = tok.encode(prefix)
    engine.set_prefix(*engine.eval_prefix(prefix_ids))
    # whole-string tokenization, not encode_prompt's: "\n\n\nleading newlines" then merges into the
    # prefix's last token, so one sequence starts inside the cached prefix (a path the engine keeps)
    prompts = [tok.encode(prefix + t + suffix) for t in TEXTS]
    seqs = []
    for ids in prompts:
        shared = next((i for i, (a, b) in enumerate(zip(ids, prefix_ids)) if a != b), len(prefix_ids))
        seqs.append(Sequence(ids[shared:], shared, 1))
    assert any(s.start < len(prefix_ids) for s in seqs), "one input must merge with the prefix"
    batched = engine.prompt_logits(seqs)
    single = np.stack([engine.prompt_logits([s])[0] for s in seqs])
    reference = np.stack([forward(ids, merged, base.config, KVCache(base.config), 0) for ids in prompts])
    assert batched.dtype == single.dtype == np.float32
    assert np.abs(batched - single).max() < NOISE_TOL
    assert np.abs(single - reference).max() < NOISE_TOL
    assert (batched.argmax(1) == reference.argmax(1)).all()


def test_map_equals_one_by_one_and_reference_on_a_mid_size_model(mid_fn, mid_files, tmp_path):
    texts = TEXTS + [f"log line {i}: " + "error " * (i % 7) + "done" for i in range(20)]
    one_by_one = [mid_fn.generate_ids(t, max_tokens=12) for t in texts]
    assert len({tuple(o) for o in one_by_one}) > len(texts) // 2, "outputs should depend on the input"
    for batch_size in (4, 64):
        assert mid_fn.map_ids(texts, max_tokens=12, batch_size=batch_size) == one_by_one
    base, merged, _ = _engine_and_reference(*mid_files, tmp_path)
    for text, out in list(zip(texts, one_by_one))[:5]:
        assert out == reference_greedy(base, merged, mid_fn.prompt_ids(text), 12), text


def test_greedy_margins_exceed_batching_noise(mid_fn):
    """Teacher-forced along the generated tokens: at every step the winning logit leads the
    runner-up by far more than batched and one-at-a-time logits differ, so batching cannot flip it."""
    texts = TEXTS[:6]
    outs = mid_fn.map_ids(texts, max_tokens=6, batch_size=6)
    engine, prefix_ids = mid_fn._engine, mid_fn._prefix_ids
    seqs = []
    for text, out in zip(texts, outs):
        ids = mid_fn.prompt_ids(text)
        shared = mid_fn._sequence(ids, 1).start
        seqs += [Sequence(ids[shared:] + out[:t], shared, 1) for t in range(len(out))]
    batched = engine.prompt_logits(seqs)
    single = np.stack([engine.prompt_logits([s])[0] for s in seqs])
    noise = np.abs(batched - single).max()
    top2 = np.sort(single, axis=1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]).min()
    assert noise < 1e-5 and margin > 100 * noise, (noise, margin)
    assert len(prefix_ids) > 0


@pytest.fixture(scope="module")
def tiny_engine(tiny_gguf, tiny_program, tmp_path_factory):
    base, _, engine = _engine_and_reference(tiny_gguf, tiny_program, tmp_path_factory.mktemp("e"))
    prefix, suffix = TEMPLATE.split("{INPUT_PLACEHOLDER}")
    prefix_ids = base.tokenizer.encode(prefix)
    engine.set_prefix(*engine.eval_prefix(prefix_ids))
    seqs = [Sequence(base.tokenizer.encode_prompt(prefix, t, suffix)[len(prefix_ids):], len(prefix_ids), 10)
            for t in TEXTS if not t.startswith("\n")]
    return engine, seqs


def _ragged_eos(engine: Engine, seqs: list[Sequence]) -> tuple[int, list[list[int]], list[list[int]]]:
    """A token many, not all, continuations reach, used as EOS; the continuations without and with it."""
    free = [engine.generate([s], eos=-1)[0] for s in seqs]  # eos -1: never stops early
    assert all(len(o) == 10 for o in free)
    counts: dict[int, int] = {}
    for o in free:
        for t in set(o[1:]):
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=counts.get)
    want = [engine.generate([s], eos=eos)[0] for s in seqs]
    assert len({len(o) for o in want}) > 1, "outputs of different lengths expected"
    return eos, free, want


def test_ragged_eos_in_one_batch(tiny_engine):
    engine, seqs = tiny_engine
    eos, free, want = _ragged_eos(engine, seqs)
    assert want == [o[:o.index(eos)] if eos in o else o for o in free]
    for size in (2, len(seqs)):
        got = []
        for i in range(0, len(seqs), size):
            got += engine.generate(seqs[i:i + size], eos=eos)
        assert got == want, size


def test_slots_taken_in_turn_equal_one_at_a_time(tiny_engine):
    """Fewer slots than sequences: a finished sequence's slot, still holding its keys, goes to the
    next one, and steps mix one-token (decoding) segments with prompt segments."""
    engine, seqs = tiny_engine
    eos, _, want = _ragged_eos(engine, seqs)  # slots free up at different steps
    for capacity in (1, 2, 3, len(seqs)):
        assert engine.generate(seqs, eos=eos, capacity=capacity) == want, capacity


def test_prompts_split_over_several_steps(tiny_fn, monkeypatch):
    """Prompts longer than one step takes (a step without any logits in between) give the same ids."""
    from paw_lite import scheduler

    want = [tiny_fn.generate_ids(t, max_tokens=5) for t in TEXTS]
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 3)
    monkeypatch.setattr(scheduler, "MAX_ROWS", 4)
    assert [tiny_fn.generate_ids(t, max_tokens=5) for t in TEXTS] == want
    assert tiny_fn.map_ids(TEXTS, max_tokens=5, batch_size=3) == want


def test_a_models_step_row_limit_bounds_every_step(tiny_fn, monkeypatch):
    """A model's max_step_rows (Qwen3-0.6B's 512, for its activation buffers) caps the rows of every
    step below scheduler.MAX_ROWS, with the same ids."""
    want = [tiny_fn.generate_ids(t, max_tokens=5) for t in TEXTS]
    model = tiny_fn._engine.model
    rows = []
    forward = model.forward

    def counted(cache, step, tokens, wanted):
        rows.append(len(tokens))
        return forward(cache, step, tokens, wanted)

    monkeypatch.setattr(model, "max_step_rows", 5)
    monkeypatch.setattr(model, "forward", counted)
    assert tiny_fn.map_ids(TEXTS, max_tokens=5, batch_size=3, workers=1) == want
    assert rows and max(rows) == 5


def test_a_map_frees_the_single_call_cache(tiny_fn):
    """The single call's cache (the prefix copied plus the longest call's positions) is dropped
    before a map's slot caches are made, so the peak holds one of them, not both."""
    engine = tiny_fn._engine
    tiny_fn.generate_ids(TEXTS[2], max_tokens=5)
    assert engine._solo is not None
    tiny_fn.map_ids(TEXTS[:4], max_tokens=5, workers=1)
    assert engine._solo is None
    assert tiny_fn.generate_ids(TEXTS[2], max_tokens=5) == tiny_fn.map_ids([TEXTS[2]], max_tokens=5)[0]


def test_map_workers_equal_one_at_a_time(tiny_fn, monkeypatch):
    """Two worker threads with single-threaded BLAS (forced, whatever this machine's core count)
    give the same ids, and BLAS gets its thread count back."""
    from paw_lite import blas_threads

    one_by_one = [tiny_fn.generate_ids(t) for t in TEXTS]
    before = blas_threads.controller().get()
    monkeypatch.setattr(blas_threads, "map_workers", lambda: 2)
    for batch_size in (2, 4, 64):
        assert tiny_fn.map_ids(TEXTS * 2, batch_size=batch_size) == one_by_one * 2, batch_size
    assert blas_threads.controller().get() == before


def test_workers_option(tiny_fn, monkeypatch):
    """workers=2 shares the inputs between two threads; workers=1 never touches BLAS's thread count."""
    from paw_lite import blas_threads

    one_by_one = [tiny_fn.generate_ids(t) for t in TEXTS]
    assert tiny_fn.map_ids(TEXTS * 2, batch_size=8, workers=2) == one_by_one * 2
    ctl = blas_threads.controller()
    calls = []
    monkeypatch.setattr(type(ctl), "set", lambda self, n: calls.append(n))
    assert tiny_fn.map_ids(TEXTS * 2, batch_size=8, workers=1) == one_by_one * 2
    assert calls == []
    assert tiny_fn.map_ids(TEXTS * 2, batch_size=8, workers=2) == one_by_one * 2
    assert calls == [1], "two workers hold BLAS at one thread"
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            tiny_fn.map(["a"], workers=bad)


def test_a_worker_error_reaches_the_caller(tiny_fn, monkeypatch):
    from paw_lite import blas_threads

    before = blas_threads.controller().get()
    monkeypatch.setattr(blas_threads, "map_workers", lambda: 2)
    tiny_fn.map_ids(TEXTS, batch_size=4)  # creates the second worker's engine
    fork = tiny_fn._map_pool.forks[0]

    def broken(*args, **kwargs):
        raise MemoryError("worker out of memory")

    monkeypatch.setattr(fork, "generate", broken)
    with pytest.raises(MemoryError, match="worker out of memory"):
        tiny_fn.map_ids(TEXTS * 4, batch_size=4)
    assert blas_threads.controller().get() == before


@pytest.mark.parametrize("alpha", [16.0, 10.0], ids=["scale 0.5 (power of two)", "scale 0.3125"])
def test_weights_are_the_reference_merge_in_the_gguf_layout(tiny_gguf, tiny_lora, tmp_path, alpha):
    from paw_lite.lora import write_adapter_gguf

    base = BaseModel.load(tiny_gguf)
    write_adapter_gguf(tmp_path / "a.gguf", tiny_lora, alpha, "f32")
    adapter = LoraAdapter.from_gguf(tmp_path / "a.gguf", base.config)
    # The oracle: the textbook merge, W + scale * (B @ A) in float32, one target at a time.
    scale = np.float32(adapter.scale)
    merged = {f"{t}.weight": base.weights[f"{t}.weight"] + scale * (b @ a) for t, (a, b) in adapter.pairs.items()}
    before = {k: v.copy() for k, v in base.weights.items()}
    shared = Weights.from_gguf_names(base.weights, base.config, adapter.pairs, adapter.scale)
    assert all(np.array_equal(base.weights[k], v) for k, v in before.items()), "the base is left as it was"
    owned_dict = {k: v.copy() for k, v in base.weights.items()}
    loaded_qkv = owned_dict["blk.1.attn_qkv.weight"]
    owned = Weights.from_gguf_names(owned_dict, base.config, adapter.pairs, adapter.scale, consume=True)
    assert owned_dict == {}, "consume pops every tensor"
    assert np.shares_memory(owned.layers[1].attn_qkv, loaded_qkv), "merged in the loaded tensor's own memory"
    frozen = {k: v.copy() for k, v in base.weights.items()}
    frozen["blk.1.ffn_up.weight"].flags.writeable = False  # as a memory-mapped float32 GGUF gives it
    merged_frozen = Weights.from_gguf_names(frozen, base.config, adapter.pairs, adapter.scale, consume=True)
    np.testing.assert_array_equal(merged_frozen.layers[1].ffn_up, merged["blk.1.ffn_up.weight"])
    plain_dict = {k: v.copy() for k, v in base.weights.items()}
    loaded_down = plain_dict["blk.1.ffn_down.weight"]
    plain = Weights.from_gguf_names(plain_dict, base.config, consume=True)
    assert plain.layers[1].ffn_down is loaded_down, "no LoRA: the loaded matrix itself, no copy"
    for w in (shared, owned):
        layer = w.layers[1]
        for name, arr in (("attn_qkv", layer.attn_qkv), ("attn_output", layer.attn_output),
                          ("ffn_up", layer.ffn_up), ("ffn_down", layer.ffn_down)):
            ref = merged[f"blk.1.{name}.weight"]
            assert arr.flags.c_contiguous and np.array_equal(arr.view(np.uint32), ref.view(np.uint32)), name
        np.testing.assert_array_equal(w.head, base.weights["token_embd.weight"])
        np.testing.assert_array_equal(w.embed(np.array([5, 50256, 5])), base.weights["token_embd.weight"][[5, 50256, 5]])


@pytest.mark.parametrize("rows", [1, 2, 37, SMALL_PRODUCT_ROWS - 1, SMALL_PRODUCT_ROWS, SMALL_PRODUCT_ROWS + 8])
def test_projection_forms_agree_with_the_plain_product(rows):
    """project's three forms (matrix-vector, transposed product, x @ w.T) around the row thresholds."""
    from paw_lite.products import project

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 96), dtype=np.float32)
    w = rng.standard_normal((160, 96), dtype=np.float32)
    scratch = np.full(160 * min(rows, SMALL_PRODUCT_ROWS), np.nan, np.float32)
    out = np.full((rows, 160), np.nan, np.float32)
    got = project(x, w, out, scratch)
    assert got is out
    expect = x.astype(np.float64) @ w.T.astype(np.float64)
    # float32 products of length 96 with unit-normal terms: rounding stays far below 1e-4
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-4)


def test_inplace_kernels_are_bit_identical_to_the_reference():
    from paw_lite.gpt2_packed import gelu_inplace, layer_norm_into
    from paw_lite.gpt2 import gelu, layer_norm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((150, 96)) * 3).astype(np.float32)
    g, b = rng.standard_normal(96).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    ln = layer_norm_into(x, g, b, 1e-5, np.empty_like(x), np.empty_like(x))
    assert np.array_equal(ln.view(np.uint32), layer_norm(x, g, b, 1e-5).view(np.uint32))
    y = x.copy()
    gelu_inplace(y, np.empty((64, 96), np.float32))
    assert np.array_equal(y.view(np.uint32), gelu(x).view(np.uint32))


@pytest.mark.parametrize("n_rows", [1, 2, 5])
def test_greedy_over_head_blocks_is_the_argmax_of_the_logits(tiny_engine, monkeypatch, n_rows):
    """Generation picks tokens from a running maximum over vocabulary blocks of the head; it must
    equal np.argmax of the full logits, ties included (the first maximum wins, within a block and
    across blocks), and the logits must be the head products themselves."""
    import dataclasses

    from paw_lite import products

    engine, _ = tiny_engine
    monkeypatch.setattr(products, "_HEAD_MIN_BLOCK", 7)
    monkeypatch.setattr(products, "_HEAD_MAX_BLOCK", 7)  # 7 does not divide the vocabulary
    rng = np.random.default_rng(4)
    n_vocab, d = engine.w.head.shape
    head = rng.standard_normal((n_vocab, d)).astype(np.float32)
    head[[12, 30, 31]] = head[10]  # ties with row 10: the same block (12) and later blocks (30, 31)
    head[n_vocab - 1] = head[n_vocab - 2]  # a tie inside the last, partial block
    twin = Engine.gpt2(dataclasses.replace(engine.w, head=head), engine.config).model
    h = rng.standard_normal((n_rows, d)).astype(np.float32)
    h[0] = head[10] * 3  # row 0's maximum is the tied row 10
    if n_rows > 2:
        h[2] = head[n_vocab - 2] * 3
    full = h @ head.T
    logits = twin.logits(h)
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-4)
    assert twin.greedy(h) == np.argmax(logits, axis=1).tolist() == np.argmax(full, axis=1).tolist()
    assert twin.greedy(h)[0] == 10 and (n_rows < 3 or twin.greedy(h)[2] == n_vocab - 2)


def test_decode_memory_stays_flat(mid_fn):
    """Buffers are allocated once per call, not per token: the traced peak (NumPy reports its
    allocations to tracemalloc) of a 41-token call exceeds a 1-token call's by no more than the
    keys and values of the 40 extra positions plus one logits row."""
    import tracemalloc

    text = "kernel panic - not syncing"
    mid_fn.generate_ids(text, max_tokens=41)  # warm the workspace
    peaks = []
    for n in (1, 41):
        tracemalloc.start()
        mid_fn.generate_ids(text, max_tokens=n)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    c = mid_fn.config
    kv_bytes = 2 * c.n_layer * c.n_embd * 4 * 40
    assert peaks[1] - peaks[0] < kv_bytes + 4 * c.n_vocab, peaks


def test_an_empty_prefix_works_batched_and_alone(tiny_gguf, tiny_lora, tmp_path):
    """A template that starts with the placeholder has no prefix to share: every token is the input's."""
    program = make_program(tmp_path / "noprefix.paw", tiny_lora, 16.0, template="{INPUT_PLACEHOLDER}\n[END_INPUT]")
    base = BaseModel.load(tiny_gguf)
    merged = LoraAdapter.from_program(paw_lite.Program.load(program), base.config).merged_into(base.weights, base.config)
    with paw_lite.function(program, base_model=tiny_gguf, cache_dir=tmp_path / "c") as f:
        assert f._prefix_k.shape[2] == 0
        texts = [t for t in TEXTS if t]
        one_by_one = [f.generate_ids(t, max_tokens=6) for t in texts]
        assert f.map_ids(texts, max_tokens=6, batch_size=4) == one_by_one
        for text, out in list(zip(texts, one_by_one))[:3]:
            assert out == reference_greedy(base, merged, f.prompt_ids(text), 6)


def test_on_tokens_reports_every_token_of_a_call(tiny_fn):
    for text in TEXTS[:4]:
        counts: list[int] = []
        ids = tiny_fn.generate_ids(text, on_tokens=counts.append)
        assert ids == tiny_fn.generate_ids(text) and len(ids) > 1
        assert counts == [1] * len(ids)  # one call per step, one token each
        seen: list[int] = []
        assert tiny_fn(text, max_tokens=3, on_tokens=seen.append) == tiny_fn(text, max_tokens=3) and seen == [1, 1, 1]


# The interrupt tests below order the two map threads with events, never with sleeps or step counts:
# which thread runs first is the scheduler's choice, and a busy CI machine chooses differently. An
# event wait is bounded only so that a broken engine fails the test instead of hanging it; the bound
# is far above any step of the tiny model, even on a loaded machine.
EVENT_WAIT_S = 60


def _watch_other_worker(monkeypatch, before_step=None):
    """Wraps Engine.generate and GPT2Packed.forward (one evaluation step) so the test sees each map thread's stop event and
    counts the other (non-main) worker's steps: "before" those that began while its stop event was
    clear, "after" those that began once it was set. before_step(is_main, n) runs at the start of a
    step (n counts that thread's steps), before the real step."""
    import threading

    from paw_lite.engine import Engine
    from paw_lite.gpt2_packed import GPT2Packed

    local = threading.local()
    steps = {"main": 0, "before": 0, "after": 0}
    real_generate, real_step = Engine.generate, GPT2Packed.forward

    def generate(self, *args, stop=None, **kwargs):
        local.stop = stop
        return real_generate(self, *args, stop=stop, **kwargs)

    def step(self, *args, **kwargs):
        is_main = threading.current_thread() is threading.main_thread()
        stop = getattr(local, "stop", None)
        if is_main:
            steps["main"] += 1
        else:
            steps["after" if stop is not None and stop.is_set() else "before"] += 1
        if before_step is not None:
            before_step(is_main, steps["main"] if is_main else steps["before"] + steps["after"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", generate)
    monkeypatch.setattr(GPT2Packed, "forward", step)
    return steps


def test_an_interrupt_stops_every_worker_within_one_step(tiny_fn, monkeypatch):
    """A Ctrl-C lands in the calling thread; the other worker used to finish its whole piece (up to
    64 inputs run to the context end: a minute in a batch run) before the KeyboardInterrupt was raised.
    Once the stop event is set, the other worker may finish the step it is in (its check came before
    the event) and must start no other: at most one step begins after the event, whatever the timing."""
    import threading

    from paw_lite import blas_threads

    monkeypatch.setattr(blas_threads, "map_workers", lambda: 2)
    tiny_fn.map_ids(TEXTS, batch_size=4)  # creates the second worker's engine
    other_stepping = threading.Event()

    def before_step(is_main: bool, n: int) -> None:
        if not is_main:
            other_stepping.set()
        elif n == 3:
            # The interrupt must find the other worker inside its piece, not yet started or done.
            assert other_stepping.wait(EVENT_WAIT_S), "the other map worker never started a step"
            raise KeyboardInterrupt

    steps = _watch_other_worker(monkeypatch, before_step)
    with pytest.raises(KeyboardInterrupt):
        tiny_fn.map_ids(TEXTS * 16, batch_size=8)  # two pieces of 32 inputs x 4 in flight, run to the context end
    assert steps["main"] == 3 and steps["before"] > 0 and steps["after"] <= 1, steps
    monkeypatch.undo()
    assert tiny_fn.map_ids(TEXTS, max_tokens=4, batch_size=4) == [tiny_fn.generate_ids(t, max_tokens=4) for t in TEXTS]


def test_a_call_from_inside_a_call_is_refused_not_a_deadlock(tiny_fn):
    def reenter(n: int) -> None:
        tiny_fn("again", max_tokens=1)

    with pytest.raises(PawError, match="called from inside one of its own calls"):
        tiny_fn("x", max_tokens=3, on_tokens=reenter)
    with pytest.raises(PawError, match="called from inside"):
        tiny_fn("x", max_tokens=3, on_tokens=lambda n: tiny_fn.map(["a"]))
    assert tiny_fn("x", max_tokens=3) == tiny_fn("x", max_tokens=3)  # the lock was released


def test_on_tokens_must_be_callable_before_any_work(tiny_fn):
    with pytest.raises(TypeError, match="on_tokens must be a function"):
        tiny_fn("x", on_tokens=5)


def test_an_interrupt_while_waiting_for_the_other_worker_stops_it(tiny_fn, monkeypatch):
    """The calling thread may run out of groups first and wait for the other worker: a Ctrl-C then
    lands in that wait, which also has to stop the other worker, not wait for its piece. The events
    make that order certain: the main thread's first step waits until the other worker is in its
    first step, and that step waits until the main thread has run out of groups and is waiting."""
    import threading

    from paw_lite import blas_threads, parallel_map

    monkeypatch.setattr(blas_threads, "map_workers", lambda: 2)
    tiny_fn.map_ids(TEXTS, batch_size=4)
    other_stepping, main_waiting = threading.Event(), threading.Event()
    real_wait = parallel_map.wait

    def before_step(is_main: bool, n: int) -> None:
        if n != 1:
            return
        if is_main:
            assert other_stepping.wait(EVENT_WAIT_S), "the other map worker never started a step"
        else:
            other_stepping.set()
            assert main_waiting.wait(EVENT_WAIT_S), "the main thread never waited for the other worker"

    def wait(futures):
        if not main_waiting.is_set():
            main_waiting.set()
            raise KeyboardInterrupt
        return real_wait(futures)

    steps = _watch_other_worker(monkeypatch, before_step)
    monkeypatch.setattr(parallel_map, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        tiny_fn.map_ids(TEXTS * 16, batch_size=8)
    assert main_waiting.is_set() and steps["before"] >= 1 and steps["after"] <= 1, steps


@pytest.mark.parametrize("workers", [1, 2])
def test_map_reports_each_result_as_it_finishes(tiny_fn, workers):
    results = {}

    def on_result(i: int, output: str) -> None:
        assert i not in results
        results[i] = output

    texts = TEXTS * 3
    outs = tiny_fn.map(texts, max_tokens=5, batch_size=4, workers=workers, on_result=on_result)
    assert results == dict(enumerate(outs)) and outs == [tiny_fn(t, max_tokens=5) for t in texts]
    seen = []
    assert tiny_fn.map(["a", "b"], max_tokens=0, on_result=lambda i, out: seen.append((i, out))) == ["", ""]
    assert seen == [(0, ""), (1, "")]
