"""GGUF files from strangers: a program's adapter.gguf and interpreter models. Every malformed or
hostile header is refused with an error naming the file and the problem, before any allocation
that the header's numbers could inflate (checked with tracemalloc), and the process survives."""

from __future__ import annotations

import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

import paw_lite
from paw_lite.base_model import BaseModel
from paw_lite.errors import IncompatibleModelError, InvalidFileError
from paw_lite.gguf_file import ADAPTER_LIMITS, read_index
from paw_lite.gpt2_layout import GPT2Config
from paw_lite.lora import LoraAdapter, write_adapter_gguf
from paw_lite.program import Program

from conftest import make_program, random_lora
from file_craft import ADAPTER_KVS, peak_while, f32_tensor, gguf, gguf_fields, gguf_table, gstr, kv, kv_array, kv_scalar, kv_str, patched, tensor_info

CONFIG = GPT2Config(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_ff=256, eps=1e-5)
SMALL = 4 * 1024 * 1024  # the most any refused header below may cost (the files themselves are < 100 KB)


def refused(read, path: Path, *needles: str, error=InvalidFileError, max_bytes: int | None = SMALL) -> str:
    """Assert `read(path)` raises `error` naming the file and the needles, quickly and cheaply."""
    caught = []

    def run():
        with pytest.raises(error) as exc:
            read(path)
        caught.append(str(exc.value))

    t0 = time.perf_counter()
    if max_bytes:
        peak = peak_while(run)
    else:  # tracemalloc slows a vocabulary parse ~5x: traced only where it proves something
        peak = 0
        run()
    elapsed = time.perf_counter() - t0
    message = caught[0]
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, message
    assert not max_bytes or peak < max_bytes, f"{peak} bytes allocated to refuse {path.name}: {message}"
    assert elapsed < 10, f"{elapsed:.1f} s to refuse {path.name}"  # the old reader hung for ever on some of these
    return message


def read_adapter(path: Path):
    return LoraAdapter.from_gguf(path, CONFIG)


@pytest.fixture(scope="module")
def adapter_bytes(tmp_path_factory) -> bytes:
    """A valid rank-32 Q8_0 adapter for the tiny model."""
    path = write_adapter_gguf(tmp_path_factory.mktemp("a") / "a.gguf", random_lora(2, 64, 32), 16.0, "q8_0")
    read_adapter(path)
    return path.read_bytes()


def write(tmp_path: Path, raw: bytes, name: str = "adapter.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(raw)
    return path


# -- adapter.gguf: magic, version, truncation ------------------------------------------------------

def test_wrong_magic(tmp_path, adapter_bytes):
    refused(read_adapter, write(tmp_path, b"GGML" + adapter_bytes[4:]), "not a GGUF file (magic b'GGML'")


@pytest.mark.parametrize("version, message", [
    (1, "GGUF version 1 is not supported"),
    (4, "GGUF version 4 is not supported"),
    (0x03000000, "a big-endian GGUF file"),
])
def test_wrong_version(tmp_path, adapter_bytes, version, message):
    refused(read_adapter, write(tmp_path, patched(adapter_bytes, 4, "<I", version)), message)


def test_truncated_anywhere(tmp_path, adapter_bytes):
    """Cut in the fixed header, the key/value table, the tensor table and the tensor data."""
    keys, tensors, data_start = gguf_table(adapter_bytes)
    last = max(tensors.values(), key=lambda t: t["data"])
    cuts = [0, 3, 10, 23, keys["adapter.type"] + 6, tensors["blk.1.ffn_down.weight.lora_b"]["type"] + 2,
            data_start - 1, last["data"] + 5, len(adapter_bytes) - 1]
    for cut in cuts:
        path = write(tmp_path, adapter_bytes[:cut], f"cut{cut}.gguf")
        message = refused(read_adapter, path)
        assert any(word in message for word in ("too short", "truncated", "past the end")), message


# -- adapter.gguf: absurd counts and sizes, refused before allocating -----------------------------------

@pytest.mark.parametrize("n_tensors, n_kv, message", [
    (2**60, 4, "header declares 1152921504606846976 tensors"),
    (2, 2**40, "and 1099511627776 keys"),
    (ADAPTER_LIMITS.max_tensors + 1, 4, f"at most {ADAPTER_LIMITS.max_tensors} tensors"),
    (1000, 4, "more than a"),  # fits the limits but not the file
])
def test_absurd_counts(tmp_path, n_tensors, n_kv, message):
    raw = gguf(ADAPTER_KVS, [f32_tensor("blk.0.ffn_up.weight.lora_a", 4, 64, 0)], bytes(1024), n_tensors=n_tensors, n_kv=n_kv)
    refused(read_adapter, write(tmp_path, raw), message)


@pytest.mark.parametrize("ne, message", [
    ([2**30, 2**30], "needs bytes 256..4611686018427388160 but the file has"),  # 2**60 elements in a 2 KB file
    ([64, 2**33], "dimensions [64, 8589934592]"),
    ([64, 0], "dimensions [64, 0]"),
    ([64, 4, 1, 1, 1], "has 5 dimensions, expected 1 to 4"),
    ([2**20, 2**20], "absurd dimensions"),
])
def test_absurd_dimensions(tmp_path, ne, message):
    raw = gguf(ADAPTER_KVS, [tensor_info("blk.0.ffn_up.weight.lora_a", ne, Q.F32, 0)], bytes(2048))
    refused(read_adapter, write(tmp_path, raw), message)


@pytest.mark.parametrize("entry, message", [
    (gstr(b"k" * 10) + struct.pack("<I", V.STRING) + struct.pack("<Q", 2**62), "is 4611686018427387904 bytes long"),
    (struct.pack("<Q", 2**61) + b"key", "key #4 at byte"),
    (kv_array("tokenizer.ggml.tokens", V.UINT8, [b"\0"], count=2**60), "declares 1152921504606846976"),
    (kv_array("a", V.UINT8, [bytes(5000)], count=5000), f"more than {ADAPTER_LIMITS.max_array_items} items"),
    (kv_array("a", V.STRING, [gstr("x")], count=2**40), "declares 1099511627776"),
    (kv("a", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 50_000 + struct.pack("<IQ", V.UINT8, 0)), "an array of arrays"),
    (kv("a", 13, b"\0" * 8), "unknown value type 13"),
    (kv(b"\xff\xfe", V.UINT8, b"\0"), "is not valid UTF-8"),
    (kv_scalar("general.alignment", V.UINT32, 48), "general.alignment is 48, expected a power of two"),
    (kv_str("general.alignment", "32"), "general.alignment has type STRING"),
    (kv_scalar("general.alignment", V.UINT64, 32), "general.alignment has type UINT64, expected UINT32"),
    (kv_scalar("general.alignment", V.INT32, 32), "general.alignment has type INT32, expected UINT32"),
    (ADAPTER_KVS[0], "metadata key 'general.architecture' appears twice"),
])
def test_absurd_metadata(tmp_path, entry, message):
    """Lengths and counts the file cannot hold (the original reader looped for ever on a 2**60-item
    array, and recursed to a crash on nested arrays), unknown types, bad keys."""
    raw = gguf([*ADAPTER_KVS, entry], [f32_tensor("blk.0.ffn_up.weight.lora_a", 4, 64, 0)], bytes(1024))
    refused(read_adapter, write(tmp_path, raw), message)


@pytest.mark.parametrize("info, message", [
    (tensor_info("x" * 64, [64, 4], Q.F32, 0), "name of tensor #0 at byte"),
    (tensor_info("", [64, 4], Q.F32, 0), "an empty name"),
    (tensor_info(b"\xc3\x28", [64, 4], Q.F32, 0), "not valid UTF-8"),
    (tensor_info("blk.0.ffn_up.weight.lora_a", [64, 4], 99, 0), "unknown type 99"),
    (tensor_info("blk.0.ffn_up.weight.lora_a", [64, 4], Q.F32, 16), "not a multiple of the alignment 32"),
    (tensor_info("blk.0.ffn_up.weight.lora_a", [64, 4], Q.F32, 2**63), "needs bytes"),
    (tensor_info("blk.0.ffn_up.weight.lora_a", [64, 4], Q.Q4_K, 0), "rows of 64 values, not a multiple of the Q4_K block of 256"),
])
def test_bad_tensor_records(tmp_path, info, message):
    raw = gguf(ADAPTER_KVS, [info], bytes(2048))
    refused(read_adapter, write(tmp_path, raw), message)


def test_duplicate_tensor_names(tmp_path):
    infos = [f32_tensor("blk.0.ffn_up.weight.lora_a", 4, 64, 0), f32_tensor("blk.0.ffn_up.weight.lora_a", 4, 64, 1024)]
    refused(read_adapter, write(tmp_path, gguf(ADAPTER_KVS, infos, bytes(2048))), "a duplicate name 'blk.0.ffn_up.weight.lora_a'")


# -- adapter.gguf: the wrong adapter for this base model ----------------------------------------------

def adapter_file(tmp_path, tensors, alpha=16.0, kind="f32", name="adapter.gguf") -> Path:
    return write_adapter_gguf(tmp_path / name, tensors, alpha, kind)


def lora(rank=8, **changes):
    t = random_lora(2, 64, rank)
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del t[name]
        else:
            t[name] = value
    return t


@pytest.mark.parametrize("tensors, error, message", [
    ({**lora(), "token_embd.weight": np.zeros((8, 64), np.float32)}, InvalidFileError, "'token_embd.weight' is not a GPT-2 LoRA tensor"),
    ({**lora(), "blk.0.attn_q.weight.lora_a": np.zeros((8, 64), np.float32)}, InvalidFileError, "'blk.0.attn_q.weight.lora_a' is not a GPT-2 LoRA tensor"),
    (lora(**{"blk.1.ffn_up.weight.lora_b": None}), InvalidFileError, "blk.1.ffn_up.weight.lora_a has no matching blk.1.ffn_up.weight.lora_b"),
    (lora(**{"blk.0.ffn_up.weight.lora_b": np.zeros((256, 4), np.float32)}), InvalidFileError, "different ranks [4, 8]"),
    (lora(**{"blk.0.ffn_down.weight.lora_a": np.zeros((8, 64), np.float32)}), IncompatibleModelError, "blk.0.ffn_down.weight.lora_a has shape (8, 64), expected (8, 256)"),
    (lora(**{"blk.0.attn_qkv.weight.lora_b": np.zeros((64, 8), np.float32)}), IncompatibleModelError, "expected (192, 8)"),
    ({**lora(), "blk.1.ffn_up.weight.lora_a": np.zeros((4, 64), np.float32), "blk.1.ffn_up.weight.lora_b": np.zeros((256, 4), np.float32)},
     InvalidFileError, "different ranks [4, 8]"),
    ({**lora(), "blk.7.ffn_up.weight.lora_a": np.zeros((8, 64), np.float32), "blk.7.ffn_up.weight.lora_b": np.zeros((256, 8), np.float32)},
     IncompatibleModelError, "targets layer 7; the base model has 2 layers"),
    ({"blk.0.ffn_up.weight.lora_a": np.zeros(64, np.float32), "blk.0.ffn_up.weight.lora_b": np.zeros((256, 1), np.float32)},
     IncompatibleModelError, "lora_a has shape (64,)"),
])
def test_wrong_names_or_shapes_for_the_base_model(tmp_path, tensors, error, message):
    refused(read_adapter, adapter_file(tmp_path, tensors), message, error=error)


def test_an_adapter_with_no_tensors(tmp_path):
    refused(read_adapter, write(tmp_path, gguf(ADAPTER_KVS, [])), "holds no LoRA tensors")


@pytest.mark.parametrize("key, value, error, message", [
    ("general.type", kv_str("general.type", "model"), IncompatibleModelError, "general.type is 'model', expected 'adapter'"),
    ("general.architecture", kv_str("general.architecture", "llama"), IncompatibleModelError, "general.architecture is 'llama', expected 'gpt2'"),
    ("adapter.type", kv_str("adapter.type", "ia3"), IncompatibleModelError, "adapter.type is 'ia3', expected 'lora'"),
    ("adapter.type", None, InvalidFileError, "metadata key 'adapter.type' is missing"),
    ("adapter.lora.alpha", None, InvalidFileError, "metadata key 'adapter.lora.alpha' is missing"),
    ("adapter.lora.alpha", kv_str("adapter.lora.alpha", "16"), InvalidFileError, "is '16', expected a number"),
    ("adapter.lora.alpha", kv_scalar("adapter.lora.alpha", V.FLOAT32, math.nan), InvalidFileError, "LoRA alpha is nan"),
    ("adapter.lora.alpha", kv_scalar("adapter.lora.alpha", V.FLOAT32, -16.0), InvalidFileError, "LoRA alpha is -16.0"),
    ("adapter.lora.alpha", kv_scalar("adapter.lora.alpha", V.FLOAT32, math.inf), InvalidFileError, "LoRA alpha is inf"),
])
def test_adapter_metadata(tmp_path, key, value, error, message):
    kvs = [e for e in ADAPTER_KVS if key.encode() not in e[8:8 + len(key)]]
    assert len(kvs) == 3
    if value is not None:
        kvs.append(value)
    data = np.zeros((8, 64), np.float32).tobytes() + np.zeros((256, 8), np.float32).tobytes()
    infos = [f32_tensor("blk.0.ffn_up.weight.lora_a", 8, 64, 0), f32_tensor("blk.0.ffn_up.weight.lora_b", 256, 8, 8 * 64 * 4)]
    refused(read_adapter, write(tmp_path, gguf(kvs, infos, data)), message, error=error)


# -- adapter.gguf: tensor types and values -----------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16])
def test_unsupported_tensor_types(tmp_path, qtype):
    from gguf import GGUFWriter, quants

    path = tmp_path / "adapter.gguf"
    w = GGUFWriter(path, "gpt2")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    for name, arr in lora(rank=32).items():
        w.add_tensor(name, quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(read_adapter, path, f"has type {qtype.name}; supported here: F16, F32, Q4_0, Q8_0")


def poke_tensor(raw: bytes, name: str, offset_in_data: int, fmt: str, value) -> bytes:
    _, tensors, _ = gguf_table(raw)
    return patched(raw, tensors[name]["data"] + offset_in_data, fmt, value)


@pytest.mark.parametrize("kind, offset, fmt, value", [
    ("f32", 40, "<f", math.nan),
    ("f32", 0, "<f", -math.inf),
    ("f16", 6, "<H", 0x7C00),  # +inf
    ("q8_0", 0, "<H", 0x7E00),  # a block scale that is NaN
    ("q4_0", 18, "<H", 0xFC00),  # the second block's scale, -inf
])
def test_nan_or_inf_values(tmp_path, kind, offset, fmt, value):
    path = adapter_file(tmp_path, lora(rank=32), kind=kind)
    raw = poke_tensor(path.read_bytes(), "blk.1.attn_output.weight.lora_b", offset, fmt, value)
    refused(read_adapter, write(tmp_path, raw, "nan.gguf"), "tensor blk.1.attn_output.weight.lora_b holds NaN or Inf values")


# -- through a program: errors name the bundle's member, the temp file is gone --------------------------

def test_a_bad_adapter_in_a_bundle_is_named_by_the_bundle(tmp_path, tiny_gguf, adapter_bytes, tiny_program):
    prog = Program.load(tiny_program)
    cut = Program(meta=prog.meta, template=prog.template, adapter_gguf=adapter_bytes[:3000], pseudo_program=prog.pseudo_program)
    path = cut.save(tmp_path / "cut.paw")
    with pytest.raises(InvalidFileError) as exc:
        paw_lite.function(path, base_model=tiny_gguf, cache_dir=tmp_path / "cache")
    message = str(exc.value)
    assert message.startswith(f"{path}: adapter.gguf: ") and "truncated" in message, message
    assert not (tmp_path / "cache" / "tmp").exists()  # read from memory: no temporary copy is written


def test_meta_json_rank_must_match_the_adapter(tmp_path, tiny_gguf):
    path = make_program(tmp_path / "r.paw", random_lora(2, 64, 8), 16.0)
    prog = Program.load(path)
    liar = Program(meta={**prog.meta, "lora_rank": 64}, template=prog.template, adapter_gguf=prog.adapter_gguf)
    with pytest.raises(IncompatibleModelError, match="meta.json says lora_rank 64 but adapter.gguf has 8"):
        paw_lite.function(liar.save(tmp_path / "liar.paw"), base_model=tiny_gguf, cache_dir=tmp_path)
    alpha_liar = Program(meta={**prog.meta, "lora_alpha": 32}, template=prog.template, adapter_gguf=prog.adapter_gguf)
    with pytest.raises(IncompatibleModelError, match="meta.json says lora_alpha 32 but adapter.gguf has 16.0"):
        paw_lite.function(alpha_liar.save(tmp_path / "alpha.paw"), base_model=tiny_gguf, cache_dir=tmp_path)


# -- interpreter models: the same header checks ------------------------------------------------------

@pytest.fixture(scope="module")
def model_bytes(tiny_gguf) -> bytes:
    return tiny_gguf.read_bytes()


def test_model_wrong_magic_version_and_truncation(tmp_path, model_bytes):
    refused(BaseModel.load, write(tmp_path, b"GGLA" + model_bytes[4:], "m1.gguf"), "not a GGUF file")
    refused(BaseModel.load, write(tmp_path, patched(model_bytes, 4, "<I", 7), "m2.gguf"), "GGUF version 7 is not supported")
    _, tensors, _ = gguf_table(model_bytes)
    for cut in (20, tensors["token_embd.weight"]["type"], len(model_bytes) // 2, len(model_bytes) - 1):
        path = write(tmp_path, model_bytes[:cut], f"cut{cut}.gguf")
        with pytest.raises(InvalidFileError, match=r"too short|truncated|past the end") as exc:
            BaseModel.load(path)
        assert str(path) in str(exc.value)


def test_model_absurd_counts_and_sizes_are_refused_before_allocating(tmp_path, model_bytes):
    keys, tensors, _ = gguf_table(model_bytes)
    cases = {
        "tensors.gguf": patched(model_bytes, 8, "<Q", 2**62),
        "kvs.gguf": patched(model_bytes, 16, "<Q", 2**40),
        "tokens.gguf": patched(model_bytes, keys["tokenizer.ggml.tokens"] + 8, "<Q", 2**60),  # the vocabulary's length
        "dims.gguf": patched(model_bytes, tensors["position_embd.weight"]["ne"][1], "<Q", 2**31),
        "ndims.gguf": patched(model_bytes, tensors["output_norm.bias"]["n_dims"], "<I", 2**31),
        "offset.gguf": patched(model_bytes, tensors["token_embd.weight"]["offset"], "<Q", 2**62),
    }
    for name, raw in cases.items():
        # A model's own vocabulary is parsed before its tensors: bounded by the file, not the header.
        # Memory is traced for the two cases that declare the most (2**60 strings, 2**37 floats).
        traced = name in ("tokens.gguf", "dims.gguf")
        refused(BaseModel.load, write(tmp_path, raw, name), max_bytes=2 * len(model_bytes) if traced else None)


def test_model_context_length_cannot_inflate_the_kv_cache(tmp_path, model_bytes):
    """context_length 2**31 in the metadata (a 512 GB position table): refused against the position
    table the file really holds, as an InvalidFileError, not a MemoryError."""
    keys, _, _ = gguf_table(model_bytes)
    raw = patched(model_bytes, keys["gpt2.context_length"] + 4, "<I", 2**31)
    message = refused(BaseModel.load, write(tmp_path, raw, "ctx.gguf"), max_bytes=None)
    assert "position_embd.weight" in message or "context" in message, message


def test_model_unsupported_tensor_type(tmp_path, model_bytes):
    _, tensors, _ = gguf_table(model_bytes)
    raw = patched(model_bytes, tensors["blk.0.ffn_up.weight"]["type"], "<I", int(Q.Q4_1))
    with pytest.raises(InvalidFileError, match="Q4_1") as exc:
        BaseModel.load(write(tmp_path, raw, "q41.gguf"))
    assert "blk.0.ffn_up.weight" in str(exc.value)


def test_model_nan_weights(tmp_path, model_bytes):
    _, tensors, _ = gguf_table(model_bytes)
    raw = patched(model_bytes, tensors["blk.1.ffn_norm.weight"]["data"] + 8, "<f", math.nan)
    with pytest.raises(InvalidFileError, match=r"blk\.1\.ffn_norm\.weight holds NaN or Inf"):
        BaseModel.load(write(tmp_path, raw, "nan.gguf"))


def test_read_index_refuses_what_it_cannot_bound(tmp_path, model_bytes):
    """The one reader every GGUF goes through (also before llama.cpp opens a file) applies the walk."""
    keys, _, _ = gguf_table(model_bytes)
    raw = patched(model_bytes, keys["tokenizer.ggml.merges"] + 8, "<Q", 2**60)
    refused(read_index, write(tmp_path, raw, "merges.gguf"), "declares 1152921504606846976")
    read_index(write(tmp_path, model_bytes, "ok.gguf"))  # and accepts the valid file


def test_model_cut_inside_a_length_field_of_its_vocabulary(tmp_path, model_bytes):
    """Found by fuzzing BaseModel.load: a file cut inside a vocabulary string's length field once
    raised struct.error from the fast index reader."""
    keys, _, _ = gguf_table(model_bytes)
    start = keys["tokenizer.ggml.tokens"]
    n_tokens = struct.unpack_from("<Q", model_bytes, start + 8)[0]
    # a token's length field far enough in that "count * 8 bytes remain" still holds at the cut
    pos = next(p for p, w in gguf_fields(model_bytes) if w == 8 and p > start + 12 + 8 * n_tokens + 64)
    refused(BaseModel.load, write(tmp_path, model_bytes[:pos + 4], "cut.gguf"), max_bytes=None)
