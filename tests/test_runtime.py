"""Running programs: greedy output equals transformers+PEFT and llama.cpp; prefix caching; errors."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import paw_lite
from paw_lite.errors import ContextOverflowError, IncompatibleModelError, InvalidFileError, ModelNotFoundError, PawError
from paw_lite.lora import write_peft_dir, LoraAdapter
from paw_lite.program import Program

from conftest import hf_greedy, make_program, random_lora
from llama_oracle import assert_same_or_near_tie, llama_greedy
from oracles import oracle

INPUTS = ["disk usage at 99% on /var", "user logged in", "  leading spaces", "ünïcödé ✓", ""]


@pytest.fixture(scope="module")
def fn(tiny_program, tiny_gguf, tmp_path_factory):
    f = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path_factory.mktemp("cache"))
    yield f
    f.close()


def test_greedy_output_equals_transformers_peft(fn, tiny_hf, tiny_program, tmp_path):
    PeftModel, GPT2LMHeadModel = oracle("peft").PeftModel, oracle("transformers").GPT2LMHeadModel

    prog = Program.load(tiny_program)
    adapter = LoraAdapter.from_program(prog, fn.config)
    write_peft_dir(tmp_path / "peft", adapter)
    hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_hf), tmp_path / "peft").eval()
    n_distinct = set()
    for text in INPUTS:
        ids = fn.prompt_ids(text)
        ours = fn.generate_ids(text)  # until EOS or the context end
        assert ours == hf_greedy(hf, ids, fn.config.n_ctx - len(ids)), text
        n_distinct.add(tuple(ours))
    assert len(n_distinct) > 1, "outputs should depend on the input"


def test_greedy_output_equals_llama_cpp(fn, tiny_gguf, tiny_program, tmp_path):
    prog = Program.load(tiny_program)
    adapter_path = tmp_path / "adapter.gguf"
    adapter_path.write_bytes(prog.adapter_gguf)
    for text in INPUTS[:3]:
        ids = fn.prompt_ids(text)
        ours = fn.generate_ids(text, max_tokens=20)
        assert ours == llama_greedy(tiny_gguf, adapter_path, ids, 20, fn.config.n_ctx), text


def test_call_returns_stripped_text_and_respects_max_tokens(fn):
    full = fn.generate_ids(INPUTS[0])
    assert fn(INPUTS[0]) == fn.tokenizer.decode(full).strip()
    assert fn.generate_ids(INPUTS[0], max_tokens=3) == full[:3]
    assert fn(INPUTS[0], max_tokens=0) == ""
    with pytest.raises(ValueError):
        fn(INPUTS[0], max_tokens=-1)


def test_calls_are_independent_and_deterministic(fn):
    first = [fn(t) for t in INPUTS]
    assert [fn(t) for t in reversed(INPUTS)] == list(reversed(first))
    assert fn.map(INPUTS) == first


def test_context_overflow_is_a_clear_error(fn):
    with pytest.raises(ContextOverflowError, match=r"prompt is \d+ tokens \(template \d+ \+ input \d+\); the interpreter's context holds 128"):
        fn("word " * 200)


def test_special_token_text_in_input_is_plain_text(fn):
    ids = fn.prompt_ids("a <|endoftext|> b")
    assert ids.count(50256) == 0


def test_lone_surrogate_is_a_clear_error(fn):
    with pytest.raises(PawError, match="not valid Unicode"):
        fn("bad \ud800 text")


def test_prefix_cache_file_is_reused_and_corruption_rebuilt(tiny_program, tiny_gguf, tmp_path, caplog):
    cache = tmp_path / "c"
    a = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=cache)
    files = list((cache / "prefix").iterdir())
    assert len(files) == 1
    fresh_k = a._prefix_k.copy()
    b = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=cache)
    np.testing.assert_array_equal(b._prefix_k, fresh_k)  # a cached prefix equals a fresh one
    assert b("user logged in") == a("user logged in")
    raw = bytearray(files[0].read_bytes())
    raw[-10] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="paw_lite"):
        c = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=cache)
    assert "checksum mismatch" in caplog.text
    np.testing.assert_array_equal(c._prefix_k, fresh_k)
    assert len(list((cache / "prefix").iterdir())) == 1  # rebuilt in place, no temp files left


def test_verbose_logging_says_what_a_load_used(tiny_program, tiny_gguf, tmp_path, caplog):
    """With -v (INFO), a load names the interpreter file, the adapter merged, and whether the
    prefix was evaluated (and cached) or read from the cache."""
    cache = tmp_path / "c"
    with caplog.at_level("INFO", logger="paw_lite"):
        paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=cache)
    first = caplog.text
    assert f"interpreter: {tiny_gguf} loaded in" in first and "LoRA rank" in first
    assert "tokens evaluated in" in first and f"prefix: cached in {cache}" in first and "read from" not in first
    caplog.clear()
    with caplog.at_level("INFO", logger="paw_lite"):
        paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=cache)
    assert "tokens' keys and values read from" in caplog.text and "evaluated" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="paw_lite"):
        paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=cache, prefix_cache_enabled=False)
    assert "(prefix cache off)" in caplog.text


def test_cache_key_covers_base_adapter_and_prefix(tiny_program, tiny_gguf, tiny_hf, tmp_path):
    other = make_program(tmp_path / "other.paw", random_lora(2, 64, 32, seed=7), 16.0)
    keys = {
        paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path / "c").prefix_cache_key,
        paw_lite.function(other, base_model=tiny_gguf, cache_dir=tmp_path / "c").prefix_cache_key,
        paw_lite.function(tiny_program, base_model=tiny_hf, cache_dir=tmp_path / "c").prefix_cache_key,
    }
    assert len(keys) == 3


def test_cache_key_and_fingerprint_cover_the_template(tiny_program, tiny_gguf, tiny_hf, tiny_lora, tmp_path):
    """Same adapter, another template whose prefix has the same number of tokens: its own prefix
    cache entry (not the first program's keys and values), and its own fingerprint, which batch
    resume compares (results of one program are never taken for another's)."""
    from conftest import TEMPLATE

    alike = make_program(tmp_path / "alike.paw", tiny_lora, 16.0, template=TEMPLATE.replace("ALERT", "ALARM"))
    other = make_program(tmp_path / "other.paw", random_lora(2, 64, 32, seed=7), 16.0)
    cache = tmp_path / "c"
    a = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=cache)
    b = paw_lite.function(alike, base_model=tiny_gguf, cache_dir=cache)
    assert len(b._prefix_ids) == len(a._prefix_ids) and b._prefix_ids != a._prefix_ids
    assert b.prefix_cache_key != a.prefix_cache_key
    fresh = paw_lite.function(alike, base_model=tiny_gguf, cache_dir=tmp_path / "fresh")
    np.testing.assert_array_equal(b._prefix_k, fresh._prefix_k)
    assert not np.array_equal(b._prefix_k, a._prefix_k)
    fingerprints = {a.fingerprint, b.fingerprint,
                    paw_lite.function(other, base_model=tiny_gguf, cache_dir=cache).fingerprint,
                    paw_lite.function(tiny_program, base_model=tiny_hf, cache_dir=cache).fingerprint}
    assert len(fingerprints) == 4


def test_hf_folder_and_gguf_give_the_same_output(fn, tiny_program, tiny_hf, tmp_path):
    g = paw_lite.function(tiny_program, base_model=tiny_hf, cache_dir=tmp_path)
    assert [g(t) for t in INPUTS] == [fn(t) for t in INPUTS]


def test_shared_base_model_is_not_modified(tiny_program, tiny_gguf, tmp_path):
    base = paw_lite.BaseModel.load(tiny_gguf)
    before = base.weights["blk.1.ffn_up.weight"].copy()
    paw_lite.function(tiny_program, base_model=base, cache_dir=tmp_path)
    np.testing.assert_array_equal(base.weights["blk.1.ffn_up.weight"], before)


def test_threads_get_the_same_results_as_sequential_calls(fn):
    want = {t: fn(t) for t in INPUTS}
    got: dict[int, str] = {}

    def work(i):
        got[i] = fn(INPUTS[i % len(INPUTS)])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got[i] == want[INPUTS[i % len(INPUTS)]] for i in range(8))


def test_adapter_for_another_base_is_refused(tiny_gguf, tmp_path):
    wide = make_program(tmp_path / "wide.paw", random_lora(2, 128, 32), 16.0)
    with pytest.raises(IncompatibleModelError, match=r"wide\.paw: adapter\.gguf: blk\.0\.attn_\w+\.weight\.lora_a has shape \(32, 128\), expected \(32, 64\)"):
        paw_lite.function(wide, base_model=tiny_gguf, cache_dir=tmp_path)
    deep = make_program(tmp_path / "deep.paw", random_lora(3, 64, 32), 16.0)
    with pytest.raises(IncompatibleModelError, match="targets layer 2; the base model has 2 layers"):
        paw_lite.function(deep, base_model=tiny_gguf, cache_dir=tmp_path)


def test_quantized_adapters_load(tiny_gguf, tiny_lora, tmp_path):
    outs = {}
    for kind in ("q4_0", "q8_0", "f16", "f32"):
        prog = make_program(tmp_path / f"{kind}.paw", tiny_lora, 16.0, kind)
        with paw_lite.function(prog, base_model=tiny_gguf, cache_dir=tmp_path) as f:
            outs[kind] = f.generate_ids("user logged in", max_tokens=5)
    assert outs["f16"] == outs["f32"]


def test_missing_base_model_says_how_to_get_it(tiny_program, tmp_path, monkeypatch):
    monkeypatch.setenv("PAW_LITE_MODELS", str(tmp_path / "models"))
    with pytest.raises(ModelNotFoundError, match=r"gpt2-q8_0\.gguf is not in the models directory .*paw-lite models pull"):
        paw_lite.function(tiny_program, cache_dir=tmp_path)
    (tmp_path / "models").mkdir()
    os.symlink(paw_lite.Program.load(tiny_program).source, tmp_path / "x")  # unrelated file
    with pytest.raises(ModelNotFoundError, match="no such interpreter model"):
        paw_lite.function(tiny_program, base_model=tmp_path / "nope.gguf", cache_dir=tmp_path)


def test_models_directory_is_used(tiny_program, tiny_gguf, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    os.symlink(tiny_gguf, tmp_path / "models" / "gpt2-q8_0.gguf")
    monkeypatch.setenv("PAW_LITE_MODELS", str(tmp_path / "models"))
    with paw_lite.function(tiny_program, cache_dir=tmp_path) as f:
        assert f.config.n_layer == 2


@pytest.mark.parametrize("bad", [2.0, 2.5, 0.5, float("nan"), float("inf"), "3", True])
def test_max_tokens_must_be_an_integer(fn, bad):
    """Refused up front, the same way for calls and maps, instead of failing deep in the engine or
    being rounded."""
    for call in (lambda: fn.generate_ids("user logged in", max_tokens=bad),
                 lambda: fn.map_ids(["user logged in", "x"], max_tokens=bad)):
        with pytest.raises(ValueError, match="max_tokens must be an integer >= 0, or None"):
            call()


def test_numpy_integers_are_integers(fn):
    want = fn.map_ids(INPUTS[:2], max_tokens=3, batch_size=2, workers=1)
    assert fn.map_ids(INPUTS[:2], max_tokens=np.int64(3), batch_size=np.int64(2), workers=np.int32(1)) == want
    assert fn.generate_ids(INPUTS[0], max_tokens=np.int64(3)) == want[0]


def test_map_of_one_string_is_refused(fn):
    with pytest.raises(TypeError, match=r"not one str: for a single input call the function itself"):
        fn.map("hello")


def test_map_errors_name_the_input(fn):
    with pytest.raises(ContextOverflowError, match=r"^input 1 of the map: (prompt|input) is \d+ "):
        fn.map(["ok", "word " * 200])
    with pytest.raises(TypeError, match=r"^input 2 of the map: input must be str, not NoneType"):
        fn.map(["a", "b", None])
    with pytest.raises(PawError, match=r"^input 0 of the map: input is not valid Unicode"):
        fn.map(["bad \udfff"])


def test_a_closed_function_refuses_every_call(tiny_program, tiny_gguf, tmp_path):
    f = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path)
    f.close()
    for call in (lambda: f("a"), lambda: f("a", max_tokens=0), lambda: f.map([]), lambda: f.map(["a"], max_tokens=0)):
        with pytest.raises(PawError, match="this function was closed"):
            call()


def test_long_inputs_run_fewer_at_a_time(fn, monkeypatch):
    """fn.map caps the sequences in flight so their keys and values stay within MAP_KV_BUDGET; the
    results are those of one call at a time either way."""
    from paw_lite import parallel_map
    from paw_lite.engine import Engine

    texts = ["word " * 40, "disk full " * 15, "x", "user logged in"]
    want = [fn.generate_ids(t, max_tokens=4) for t in texts]
    capacities = []
    real_generate = Engine.generate

    def spy(self, seqs, eos, capacity=None, **kwargs):
        capacities.append(capacity)
        return real_generate(self, seqs, eos, capacity, **kwargs)

    monkeypatch.setattr(Engine, "generate", spy)
    c = fn.config
    own_tokens = len(fn._sequence(fn.prompt_ids(texts[0]), 4).ids)  # after the shared prefix
    per_sequence = 2 * c.n_layer * c.n_embd * 4 * (own_tokens + 4)
    monkeypatch.setattr(parallel_map, "MAP_KV_BUDGET", 2 * per_sequence)  # room for two of the longest
    assert fn.map_ids(texts, max_tokens=4, batch_size=128, workers=1) == want
    assert capacities == [2]
    monkeypatch.setattr(parallel_map, "MAP_KV_BUDGET", 1)  # less than one: still one at a time
    capacities.clear()
    assert fn.map_ids(texts, max_tokens=4, batch_size=128, workers=1) == want
    assert capacities == [1]


def test_qwen3_maps_hold_a_smaller_kv_budget(monkeypatch):
    """Qwen3-0.6B's 2.4 GB of weights leave less room: its maps (and served batches) keep their keys
    and values within 384 MiB, GPT-2's within fn.map's 1 GiB; never more than MAP_KV_BUDGET."""
    from paw_lite import parallel_map
    from paw_lite.gpt2_packed import GPT2Packed
    from paw_lite.qwen3_packed import Qwen3Packed

    assert parallel_map.kv_budget(GPT2Packed) == parallel_map.MAP_KV_BUDGET == 1 << 30
    assert parallel_map.kv_budget(Qwen3Packed) == 384 << 20
    monkeypatch.setattr(parallel_map, "MAP_KV_BUDGET", 1000)
    assert parallel_map.kv_budget(Qwen3Packed) == parallel_map.kv_budget(GPT2Packed) == 1000


def test_an_unwritable_cache_folder_only_costs_the_prefix_cache(tiny_program, tiny_gguf, tmp_path, caplog):
    """The adapter is read from memory, so the cache folder holds only the prefix cache: one that
    cannot be written is a warning naming it, and the program still runs."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with caplog.at_level("WARNING", logger="paw_lite"):
        with paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=not_a_folder / "cache") as fn:
            assert isinstance(fn("some input", max_tokens=2), str)
    assert "cannot write prefix cache" in caplog.text and str(not_a_folder / "cache") in caplog.text
    assert not_a_folder.read_text() == "x"


# llama.cpp multiplies quantized weights by activations it first rounds to Q8_0 blocks (ggml's
# vec_dot_type for Q4_0 and Q8_0), so with a quantized adapter its logits drift from ours by more
# than the fp16 GELU table alone: on the program below, over the INPUTS prompts and outputs, 0.052
# max abs for both types, against 0.009 with the same adapter in f32. A token can flip only where
# its lead is under twice that.
QUANTIZED_ADAPTER_TIE = 0.1


def _gguf_py_adapter(path) -> LoraAdapter:
    """adapter.gguf dequantized by gguf-py, not by paw_lite's own Q4_0/Q8_0 code: an independent oracle."""
    from gguf import GGUFReader, quants

    reader = GGUFReader(path)
    arrays = {t.name: np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(t.shape.tolist()[::-1])
              for t in reader.tensors}
    pairs = {n.removesuffix(".weight.lora_a"): (a, arrays[n[:-1] + "b"]) for n, a in arrays.items() if n.endswith("_a")}
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    return LoraAdapter(pairs, alpha, next(iter(pairs.values()))[0].shape[0], "F32", str(path))


@pytest.mark.parametrize("kind", ["q4_0", "q8_0"])
def test_quantized_adapters_equal_transformers_and_llama_cpp(kind, tiny_gguf, tiny_hf, tmp_path):
    """Programs ship Q4_0 adapters: the same adapter.gguf run by paw_lite, by transformers + PEFT
    (the tensors dequantized by gguf-py) and by llama.cpp gives the same greedy tokens, llama.cpp
    up to near-ties. test_quantized_adapters_load only shows f16 == f32. The LoRA is gentler than
    tiny_lora (std 0.1, not 0.3): llama.cpp's activation rounding grows with the LoRA's share of
    the activations (0.86-1.03 max abs at 0.3, where all ten outputs part from llama.cpp's, some
    at leads of 0.5), and at 0.1 the LoRA still moves the logits by 6 or more."""
    PeftModel, GPT2LMHeadModel = oracle("peft").PeftModel, oracle("transformers").GPT2LMHeadModel

    prog = make_program(tmp_path / f"{kind}.paw", random_lora(2, 64, 32, std=0.1), 16.0, kind)
    adapter_path = tmp_path / "adapter.gguf"
    adapter_path.write_bytes(Program.load(prog).adapter_gguf)
    write_peft_dir(tmp_path / "peft", _gguf_py_adapter(adapter_path))
    hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_hf), tmp_path / "peft").eval()
    with paw_lite.function(prog, base_model=tiny_gguf, cache_dir=tmp_path / "c") as f:
        for text in INPUTS:
            ids = f.prompt_ids(text)
            ours = f.generate_ids(text, max_tokens=20)
            assert ours == hf_greedy(hf, ids, 20), text
            theirs = llama_greedy(tiny_gguf, adapter_path, ids, 20, f.config.n_ctx)
            assert_same_or_near_tie(ours, theirs, ids, hf, QUANTIZED_ADAPTER_TIE)


def test_a_program_built_in_memory_gets_the_checks_load_makes(tiny_program, tiny_gguf, tmp_path):
    """paw_lite.function(Program(...)) ran without them: a template without the marker failed with a
    bare IndexError after the base had loaded, another interpreter's program ran on GPT-2."""
    from paw_lite import Program

    prog = Program.load(tiny_program)
    cases = [(dict(meta=prog.meta, template="no marker"), InvalidFileError, "holds 0 {INPUT_PLACEHOLDER} markers"),
             (dict(meta=None, template=prog.template), TypeError, r"Program\.meta is a NoneType; expected a dict"),
             (dict(meta={**prog.meta, "lora_rank": np.int64(8)}, template=prog.template), InvalidFileError,
              "Program.meta is not JSON-serialisable .*use plain int, float and str values"),
             (dict(meta=prog.meta, template=prog.template + "\ud800"), InvalidFileError,
              r"Program\.template is not valid text \(a lone surrogate"),
             (dict(meta={**prog.meta, "spec": "x" * (1 << 20)}, template=prog.template), InvalidFileError,
              "meta.json is .* bytes, more than the 1048576-byte limit"),
             (dict(meta={**prog.meta, "interpreter": "qwen3"}, template=prog.template), IncompatibleModelError,
              "says interpreter 'qwen3'")]
    for fields, error, message in cases:
        with pytest.raises(error, match=message):
            paw_lite.function(Program(adapter_gguf=prog.adapter_gguf, **fields), base_model=tiny_gguf, cache_dir=tmp_path)


def test_arguments_are_refused_before_any_work(fn, tiny_program, tiny_gguf, monkeypatch):
    from paw_lite import runtime

    def no_work(*args, **kwargs):
        raise AssertionError("started before checking its arguments")

    monkeypatch.setattr(fn, "_sequence", no_work)
    with pytest.raises(TypeError, match="on_result must be a function taking"):
        fn.map(["a", "b"], on_result=5)
    monkeypatch.setattr(runtime.BaseModel, "load", no_work)
    with pytest.raises(TypeError, match=r"cache_dir must be a path \(str or os.PathLike\) or None, not int"):
        paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=123)


def test_home_relative_paths_are_expanded(tiny_program, tiny_gguf, tmp_path, monkeypatch):
    """`~/x.paw` was 'no such program' and cache_dir='~/c' made a folder named '~' in the working folder."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_program, tmp_path / "p.paw")
    shutil.copy(tiny_gguf, tmp_path / "base.gguf")
    fn = paw_lite.function("~/p.paw", base_model=paw_lite.BaseModel.load("~/base.gguf"), cache_dir="~/c")
    assert fn("user logged in", max_tokens=2) is not None
    assert (tmp_path / "c" / "prefix").is_dir() and not (tmp_path / "~").exists()


def test_reprs_are_short(fn, tiny_gguf):
    """The dataclass repr of a BaseModel printed every weight array (about a megabyte of text)."""
    from paw_lite import BaseModel

    assert len(repr(BaseModel.load(tiny_gguf))) < 500 and len(repr(fn.program)) < 2000
    assert repr(fn).startswith("<PawFunction ") and "GPT-2" in repr(fn)
