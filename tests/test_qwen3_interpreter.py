"""The NumPy Qwen3 interpreter (Standard programs) against its oracles, on the tiny random Qwen3 with
the real Qwen vocabulary (paw_lite/testing/qwen3.py: 4 layers, width 256, 4 query / 2 kv heads of
head_dim 128, 151,733 tokens):

- logits of the reference forward (`qwen3.py`) and of the packed engine (`qwen3_packed.py` under the
  shared scheduler: ragged batch, shared prefix, chunked prefill, slots in turn, fork) against
  transformers' Qwen3ForCausalLM fp32, with and without a LoRA on all 7 modules (PEFT on the
  transformers side): <= 1e-4 max abs (measured: ~1.1e-5);
- greedy outputs equal to transformers + PEFT, and to llama.cpp on the same GGUF (f32, q8_0,
  q6_k) + an adapter.gguf written with `adapter_gguf_bytes(..., arch="qwen3")`;
- a constrained pick (allowed ids, forced tokens) equal to the reference's masked greedy;
- weight loading: GGUF types decoded as gguf-py and llama.cpp decode them, errors naming the
  file, the tensor and the fix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from oracles import oracle
from paw_lite import scheduler
from paw_lite.engine import Engine, Sequence
from paw_lite.errors import IncompatibleModelError, InvalidFileError
from paw_lite.lora import LoraAdapter, write_adapter_gguf, write_peft_dir
from paw_lite.qwen3 import KVCache, forward
from paw_lite.qwen3_layout import Qwen3Config
from paw_lite.qwen3_weights import Qwen3Weights, load_qwen3, read_gguf_config, read_gguf_tensors, read_hf_tensors
from paw_lite.testing.qwen3 import ENDOFTEXT_ID, IM_END_ID, IM_START_ID, make_tiny_qwen3, random_qwen3_lora, sample_ids

torch = oracle("torch")
oracle("transformers", "peft")

LOGIT_TOL = 1e-4
EOS = (IM_END_ID, ENDOFTEXT_ID)
RANK, ALPHA = 16, 16.0
PEFT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def qwen_hf(tmp_path_factory, vocab_dir):
    """bf16, tied, sharded (like the published checkpoint): fp32 transformers holds exactly these values."""
    return make_tiny_qwen3(tmp_path_factory.mktemp("qwen_hf"), vocab_dir)


@pytest.fixture(scope="module")
def base(qwen_hf):
    return read_hf_tensors(qwen_hf)  # (config, GGUF-named float32 tensors)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, qwen_hf):
    from paw_lite.convert.qwen3 import convert_qwen3

    out_dir = tmp_path_factory.mktemp("qwen_gguf")
    cache = {}

    def get(qtype: str):
        if qtype not in cache:
            cache[qtype] = convert_qwen3(qwen_hf, out_dir / f"tiny-{qtype}.gguf", qtype)
        return cache[qtype]

    return get


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory, base):
    """adapter.gguf (f32, arch qwen3) and the PEFT folder of the same random LoRA (non-zero B)."""
    config, _ = base
    d = tmp_path_factory.mktemp("lora")
    path = write_adapter_gguf(d / "adapter.gguf", random_qwen3_lora(config, RANK), ALPHA, "f32", arch="qwen3")
    adapter = LoraAdapter.from_gguf(path, config)
    return path, write_peft_dir(d / "peft", adapter), adapter


@pytest.fixture(scope="module")
def hf_model(qwen_hf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(qwen_hf, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def peft_model(qwen_hf, adapter_files):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(qwen_hf, dtype=torch.float32)
    return PeftModel.from_pretrained(hf, adapter_files[1]).eval()


@pytest.fixture(scope="module")
def merged(base, adapter_files) -> Qwen3Weights:
    config, tensors = base
    return adapter_files[2].merged_into(tensors, config)


def _same_config(a: Qwen3Config, b: Qwen3Config) -> bool:
    """Equal, the epsilon up to GGUF's float32."""
    return dataclasses.replace(a, eps=0.0) == dataclasses.replace(b, eps=0.0) and np.float32(a.eps) == np.float32(b.eps)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=list(EOS),
                             pad_token_id=ENDOFTEXT_ID)[0, len(ids):].tolist()
    return _cut(out)


def _cut(ids: list[int]) -> list[int]:
    """Up to the first EOS of either kind."""
    for k, t in enumerate(ids):
        if t in EOS:
            return ids[:k]
    return ids


IDS = [int(t) for t in sample_ids(24, seed=3)] + [IM_START_ID, 872, 198, IM_END_ID, 1000]


def test_reference_logits_match_transformers_from_hf_folder_and_gguf(base, converted, hf_model):
    ref = hf_logits(hf_model, IDS)
    config, tensors = base
    for name, (cfg, w) in (("hf folder", (config, Qwen3Weights.from_gguf_names(tensors, config))),
                           ("f32 gguf", load_qwen3(converted("f32")))):
        assert _same_config(cfg, config), name
        ours = forward(IDS, w, cfg, KVCache(cfg, 64), 0, all_logits=True)
        assert ours.dtype == np.float32
        assert np.abs(ours - ref).max() < LOGIT_TOL, name
        # the cache: the same logits fed in two pieces
        cache = KVCache(cfg, 64)
        again = np.concatenate([forward(IDS[:11], w, cfg, cache, 0, all_logits=True),
                                forward(IDS[11:], w, cfg, cache, 11, all_logits=True)])
        assert np.abs(again - ref).max() < LOGIT_TOL, name


def test_logits_with_lora_match_peft(base, merged, peft_model, hf_model, adapter_files):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config, tensors = base
    ref = hf_logits(peft_model, IDS)
    ours = forward(IDS, merged, config, KVCache(config, 64), 0, all_logits=True)
    plain = hf_logits(hf_model, IDS)
    assert np.abs(ref - plain).max() > 0.5, "the LoRA must change the logits for this test to mean anything"
    assert np.abs(ours - ref).max() < LOGIT_TOL
    # PEFT names the tensors of a fresh LoraConfig on the 7 modules as our PEFT folder does
    from transformers import AutoModelForCausalLM

    fresh = get_peft_model(AutoModelForCausalLM.from_config(peft_model.base_model.model.config),
                           LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_MODULES))
    want = {adapter_files[2].layout.gguf_to_peft(n) for n in adapter_files[2].tensors()}
    assert set(get_peft_model_state_dict(fresh)) == want
    # merging leaves the base tensors as they were
    assert np.array_equal(Qwen3Weights.from_gguf_names(tensors, config).layers[0].attn_q, tensors["blk.0.attn_q.weight"])


@pytest.fixture(scope="module")
def batch(base):
    """A shared prefix and ragged sequences after it: whole prefix, or its first 5 tokens only."""
    prefix = [int(t) for t in sample_ids(9, seed=11)]
    rng = np.random.default_rng(5)
    seqs = [Sequence(rng.integers(0, 150000, size=n).tolist(), start, 10)
            for n, start in ((1, 9), (4, 9), (13, 5), (30, 9), (7, 0), (2, 9))]
    return prefix, seqs


def _engine(weights, config, prefix) -> Engine:
    engine = Engine.qwen3(weights, config)
    engine.set_prefix(*engine.eval_prefix(prefix))
    return engine


def test_packed_engine_logits_match_peft(base, merged, peft_model, batch):
    config, _ = base
    prefix, seqs = batch
    engine = _engine(merged, config, prefix)
    assert engine.prefix_k.shape == (config.n_layer, config.n_head_kv, len(prefix), config.head_dim)
    logits = engine.prompt_logits(seqs)
    for seq, row in zip(seqs, logits):
        ref = hf_logits(peft_model, prefix[:seq.start] + seq.ids)[-1]
        assert np.abs(row - ref).max() < LOGIT_TOL
    alone = np.stack([engine.prompt_logits([s])[0] for s in seqs])
    assert np.abs(alone - logits).max() < LOGIT_TOL


def test_greedy_equals_transformers_peft_batched_alone_chunked_and_forked(base, merged, peft_model, batch, monkeypatch):
    config, _ = base
    prefix, seqs = batch
    engine = _engine(merged, config, prefix)
    want = [hf_greedy(peft_model, prefix[:s.start] + s.ids, s.limit) for s in seqs]
    assert len({len(o) for o in want}) > 1 or all(len(o) == 10 for o in want)
    assert engine.generate(seqs, eos=EOS) == want
    assert [engine.generate([s], eos=EOS)[0] for s in seqs] == want
    assert engine.generate(seqs, eos=EOS, capacity=2) == want  # slots taken in turn
    assert engine.fork().generate(seqs, eos=EOS) == want
    # fn.map's pool: two workers (the engine and a fork) take pieces of 8 sequences
    from paw_lite.parallel_map import MapPool

    assert MapPool(engine).generate(seqs + seqs[:2], EOS, batch_size=8, workers=2) == want + want[:2]
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", 4)  # prompts over several steps, mixed with decoding rows
    monkeypatch.setattr(scheduler, "MAX_ROWS", 9)
    assert engine.generate(seqs, eos=EOS, capacity=3) == want


class Scripted:
    """A constraint that allows steps[j] (sorted ids) at pick j; a one-id step is forced."""

    def __init__(self, steps: list[list[int]]):
        self.steps, self.ids = steps, []

    @property
    def complete(self) -> bool:
        return len(self.ids) == len(self.steps)

    finished = complete

    def allowed(self) -> np.ndarray:
        return np.array(self.steps[len(self.ids)] if not self.complete else [], np.int64)

    def advance(self, token: int) -> None:
        assert token in self.steps[len(self.ids)]
        self.ids.append(token)

    def take_forced(self, limit: int) -> list[int]:
        out = []
        while len(out) < limit and not self.complete and len(self.steps[len(self.ids)]) == 1:
            out.append(self.steps[len(self.ids)][0])
            self.advance(out[-1])
        return out

    def text(self) -> bytes:
        return b""


def test_constrained_picks_and_forced_tokens_equal_the_reference(base, merged, batch):
    config, _ = base
    prefix, seqs = batch
    rng = np.random.default_rng(2)
    steps = [sorted(rng.choice(150000, 6, replace=False).tolist()), [1000], [2000],
             sorted(rng.choice(150000, 20000, replace=False).tolist()), [3000], sorted(rng.choice(150000, 3, replace=False).tolist())]
    engine = _engine(merged, config, prefix)
    got = engine.generate([Sequence(s.ids, s.start, 8, Scripted(steps)) for s in seqs], eos=EOS)
    for seq, out in zip(seqs, got):
        cache, ids, want = KVCache(config, 128), prefix[:seq.start] + seq.ids, []
        logits = forward(ids, merged, config, cache, 0)
        for allowed in steps:
            token = allowed[int(np.argmax(logits[allowed]))]
            want.append(token)
            logits = forward([token], merged, config, cache, len(ids) + len(want) - 1)
        assert out == want


def _llama_greedy(model_path, lora_path, ids: list[int], max_tokens: int) -> list[int]:
    from llama_oracle import llama_greedy

    return _cut(llama_greedy(model_path, lora_path, ids, max_tokens, n_ctx=128, eos=IM_END_ID))


def _llama_logits(model_path, lora_path, ids: list[int]) -> np.ndarray:
    llama_cpp = oracle("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path), n_ctx=64, n_batch=64, n_ubatch=64,
                          n_threads=2, verbose=False, seed=0, logits_all=True)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], np.float32)
    finally:
        llm.close()


# Max abs logit difference from llama.cpp on the same file + adapter.gguf (|logits| up to ~7).
# Measured (llama-cpp-python here, 4 prompts): f32 0.0072 (llama.cpp's f16 KV cache), q8_0 0.21 and
# q6_k 0.32 (llama.cpp also quantizes the activations for its quantized products); ~1.5x headroom.
LLAMA_TOL = {"f32": 0.011, "q8_0": 0.32, "q6_k": 0.48}


@pytest.mark.llama
@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q6_k"])
def test_logits_and_greedy_equal_llama_cpp_on_the_same_gguf_and_adapter(converted, adapter_files, batch, qtype):
    """llama.cpp runs the same file and adapter.gguf (scale alpha / rank from the file): logits
    within LLAMA_TOL, and greedy outputs equal, or parting only at a step where our two tokens'
    logits are closer than both sides' error (2 x LLAMA_TOL): measured, every f32 output is equal."""
    adapter_path = adapter_files[0]
    config, w = load_qwen3(converted(qtype), adapter_files[2].pairs, adapter_files[2].scale)
    prefix, seqs = batch
    engine = Engine.qwen3(w, config)
    for seq in seqs[:4]:
        ids = prefix[:seq.start] + seq.ids
        ours = forward(ids, w, config, KVCache(config, 64), 0, all_logits=True)
        assert np.abs(ours - _llama_logits(converted(qtype), adapter_path, ids)).max() < LLAMA_TOL[qtype]
        ours = engine.generate([Sequence(ids, 0, 8)], eos=EOS)[0]
        theirs = _llama_greedy(converted(qtype), adapter_path, ids, 8)
        if qtype == "f32":
            assert ours == theirs
        elif ours != theirs:
            k = next(k for k, (a, b) in enumerate(zip(ours + [IM_END_ID], theirs + [IM_END_ID])) if a != b)
            logits = forward(ids + ours[:k], w, config, KVCache(config, 128), 0)
            a, b = (ours + [IM_END_ID])[k], (theirs + [IM_END_ID])[k]
            assert abs(float(logits[a] - logits[b])) < 2 * LLAMA_TOL[qtype], (qtype, k, ours, theirs)


# -- weights ---------------------------------------------------------------------------------------

def test_q6_k_decoding_is_gguf_py_s_bit_for_bit_on_every_bit_pattern():
    """paw_lite's own Q6_K decoder (gguf_file.dequantize) on random blocks: every ql/qh/scale bit
    pattern, scales d of all magnitudes (NaN and Inf left out: the reader refuses them)."""
    from gguf import GGMLQuantizationType, quants

    from paw_lite.gguf_file import dequantize

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(3000, 210), dtype=np.uint8)
    d = raw[:, 208:210].copy().view("<f2")
    d[~np.isfinite(d)] = 1.0
    raw[:, 208:210] = d.view(np.uint8)
    ours = dequantize(raw.tobytes(), GGMLQuantizationType.Q6_K, (1500, 512))
    want = np.asarray(quants.dequantize(raw, GGMLQuantizationType.Q6_K), np.float32).reshape(1500, 512)
    assert np.array_equal(ours.view(np.uint32), want.view(np.uint32))


@pytest.mark.llama
def test_quantized_files_decode_as_gguf_py_and_llama_cpp_decode_them(converted, tmp_path, monkeypatch):
    """Q6_K (the published interpreter's type, paw_lite's own decoder) and Q8_0, decoded in row
    blocks, equal gguf-py's whole-tensor decoding bit for bit, and llama.cpp's own: its quantizer asked for F32 from the
    Q6_K file writes each tensor as ggml dequantizes it."""
    import ctypes

    from gguf import GGUFReader, quants

    llama_cpp = oracle("llama_cpp")

    import paw_lite.qwen3_weights as qw

    monkeypatch.setattr(qw, "_DECODE_BLOCK_FLOATS", 5000)  # force row blocks on the tiny tensors
    for qtype in ("q6_k", "q8_0"):
        path = converted(qtype)
        _, ours = read_gguf_tensors(path)
        reader = GGUFReader(path)
        kinds = {t.tensor_type.name for t in reader.tensors}
        assert qtype.upper() in kinds
        for t in reader.tensors:
            want = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(ours[t.name].shape)
            assert np.array_equal(ours[t.name], want), (qtype, t.name)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 0  # LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = 1
    out = tmp_path / "from-q6_k-f32.gguf"
    assert llama_cpp.llama_model_quantize(str(converted("q6_k")).encode(), str(out).encode(), ctypes.byref(params)) == 0
    _, llama = read_gguf_tensors(out)
    _, ours = read_gguf_tensors(converted("q6_k"))
    assert {t.tensor_type.name for t in GGUFReader(out).tensors} == {"F32"}
    for name, arr in ours.items():
        assert np.array_equal(arr, llama[name]), name


def test_bad_interpreter_files_name_the_tensor_and_the_fix(converted, tmp_path, tiny_gguf, base):
    raw = converted("f32").read_bytes()
    missing = tmp_path / "missing.gguf"
    missing.write_bytes(raw.replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_uq.weight"))
    with pytest.raises(InvalidFileError, match=r"missing\.gguf: unexpected tensors .*blk\.1\.ffn_uq\.weight.*re-convert"):
        read_gguf_config(missing)
    from file_craft import gguf_table, patched

    _, tensors, _ = gguf_table(raw)
    ne0, ne1 = tensors["blk.2.ffn_down.weight"]["ne"]  # (d, n_ff) = (256, 512): swap its dimensions
    bad = patched(patched(raw, ne0, "<Q", 256), ne1, "<Q", 512)
    (tmp_path / "shape.gguf").write_bytes(bad)
    with pytest.raises(InvalidFileError, match=r"shape\.gguf: tensor blk\.2\.ffn_down\.weight has shape \(512, 256\), "
                                               r"expected \(256, 512\).*re-convert"):
        load_qwen3(tmp_path / "shape.gguf")
    with pytest.raises(IncompatibleModelError, match=r"general\.architecture is 'gpt2', expected 'qwen3'"):
        load_qwen3(tiny_gguf)
    config, tensors = base
    partial = {n: a for n, a in tensors.items() if n != "blk.3.attn_k_norm.weight"}
    with pytest.raises(InvalidFileError, match=r"tensor blk\.3\.attn_k_norm\.weight is missing"):
        Qwen3Weights.from_gguf_names(partial, config)
    with pytest.raises(IncompatibleModelError, match=r"blk\.0\.attn_k.*expected A \(r, 256\) and B \(256, r\)"):
        Qwen3Weights.from_gguf_names(tensors, config, {"blk.0.attn_k": (np.zeros((4, 256), np.float32),
                                                                        np.zeros((512, 4), np.float32))})


def test_consuming_load_takes_the_tensors_and_stacks_in_place(base, adapter_files):
    config, tensors = base
    mine = {n: a.copy() for n, a in tensors.items()}
    w = Qwen3Weights.from_gguf_names(mine, config, adapter_files[2].pairs, adapter_files[2].scale, consume=True)
    assert not mine, "every tensor is taken"
    textbook = tensors["blk.1.ffn_up.weight"] + adapter_files[2].scale * (
        adapter_files[2].pairs["blk.1.ffn_up"][1] @ adapter_files[2].pairs["blk.1.ffn_up"][0])
    assert np.abs(w.layers[1].ffn_up - textbook).max() < 1e-6
    assert w.layers[1].ffn_gate_up.flags.c_contiguous and w.layers[1].ffn_up.base is w.layers[1].ffn_gate_up


def test_streaming_load_equals_the_dict_merge(qwen_hf, converted, merged, adapter_files):
    """load_qwen3 decodes into the final arrays and merges there: the same bits as merging the
    read tensors (`LoraAdapter.merged_into`), from the HF folder and from the F32 GGUF alike."""
    adapter = adapter_files[2]
    for source in (qwen_hf, converted("f32")):
        _, w = load_qwen3(source, adapter.pairs, adapter.scale)
        assert np.array_equal(w.head, merged.head) and np.array_equal(w.output_norm, merged.output_norm)
        for got, want in zip(w.layers, merged.layers):
            for field in dataclasses.fields(got):
                assert np.array_equal(getattr(got, field.name), getattr(want, field.name)), (source, field.name)


def test_config_from_gguf_matches_config_json(converted, base):
    config, _ = base
    _, from_file = read_gguf_config(converted("q8_0"))
    assert _same_config(from_file, config)
    assert config == Qwen3Config(n_vocab=151733, n_ctx=2048, n_embd=256, n_ff=512, n_layer=4, n_head=4, n_head_kv=2,
                                 head_dim=128, eps=1e-6, rope_theta=5e6, tied=True)
