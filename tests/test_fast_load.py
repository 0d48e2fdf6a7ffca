"""paw_lite's GGUF reader (paw_lite.gguf_file) against gguf-py, the slow reader it replaces:
the same metadata and tensor index, bit-identical dequantized tensors, the fingerprint equal to the
file's sha256, and malformed files refused with InvalidFileError (never another exception)."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paw_lite.base_model import BaseModel, file_sha256
from paw_lite.errors import InvalidFileError
from paw_lite.gguf_file import TensorInfo, dequantize, iter_tensors, numpy_shape, read_index, read_index_bytes

from file_craft import gguf, gstr, kv, kv_array, kv_scalar, kv_str, tensor_info

TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0]


def awkward_values(rows: int = 64, cols: int = 256) -> np.ndarray:
    """Rows at very different scales plus zeros, signed zeros, float16 extremes and subnormals."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, cols)) * rng.choice([1e-8, 1e-3, 1.0, 1e3, 1e4], (rows, 1))).astype(np.float32)
    x[0] = 0.0
    x[1, :6] = [-0.0, 65504.0, -65504.0, 1e-7, 6e-8, -6e-8]
    return x


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_identical_to_gguf_py(qtype):
    x = awkward_values()
    raw = quants.quantize(x, qtype)
    want = np.asarray(quants.dequantize(raw, qtype), np.float32)
    got = dequantize(raw.tobytes(), qtype, x.shape)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_index_matches_gguf_reader(tiny_gguf):
    index = read_index(tiny_gguf)
    reader = GGUFReader(tiny_gguf)
    assert set(index.fields) == {k for k in reader.fields if not k.startswith("GGUF.")}
    for key, field in index.fields.items():
        assert field.value == reader.fields[key].contents(), key
    assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(index.tensors, reader.tensors):
        assert ours.shape.tolist() == theirs.shape.tolist()
        assert ours.tensor_type == theirs.tensor_type
        assert ours.data_offset == theirs.data_offset and ours.n_bytes == theirs.n_bytes
    assert index.data_offset == reader.data_offset


@pytest.fixture(scope="module")
def q8_model(tiny_gguf, tmp_path_factory):
    """The tiny model rewritten with Q8_0 matrices, as the official interpreter file is."""
    from paw_lite.convert.gpt2 import write_gpt2_gguf

    base = BaseModel.load(tiny_gguf)
    fields = GGUFReader(tiny_gguf).fields
    tok = base.tokenizer
    out = tmp_path_factory.mktemp("q8") / "tiny-q8_0.gguf"
    return write_gpt2_gguf(out, base.config, base.weights.items(), fields["tokenizer.ggml.tokens"].contents(),
                           fields["tokenizer.ggml.merges"].contents(), list(tok.special.values()), tok.eos_id, T.Q8_0)


def test_base_model_loads_the_same_bits_as_gguf_py(q8_model):
    base = BaseModel.load(q8_model)
    reader = GGUFReader(q8_model)
    assert {t.tensor_type for t in reader.tensors} == {T.F32, T.Q8_0}
    # read as two halves on two threads, handed over in file order
    assert list(base.weights) == [t.name for t in sorted(reader.tensors, key=lambda t: t.data_offset)]
    for t in reader.tensors:
        want = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(numpy_shape(t))
        got = base.weights[t.name]
        assert got.shape == want.shape == numpy_shape(t)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), t.name
    assert base.fingerprint == file_sha256(q8_model)  # the whole file


@pytest.mark.parametrize("kind", ["q4_0", "q8_0", "f16", "f32"])
def test_adapter_bytes_are_what_gguf_py_writes(tmp_path, kind):
    """adapter.gguf is built in memory (no file to write it through): byte for byte what gguf-py's
    GGUFWriter writes for the same tensors, and read back by paw_lite and gguf-py alike."""
    from gguf import GGUFWriter

    from paw_lite.lora import ADAPTER_WRITE_TYPES, adapter_gguf_bytes

    rng = np.random.default_rng(3)
    tensors = {"blk.0.attn_qkv.weight.lora_a": rng.standard_normal((32, 64), dtype=np.float32),
               "blk.0.attn_qkv.weight.lora_b": rng.standard_normal((192, 32), dtype=np.float32),
               "blk.1.ffn_down.weight.lora_a": rng.standard_normal((32, 96), dtype=np.float32)}
    qtype = ADAPTER_WRITE_TYPES[kind]
    path = tmp_path / "gguf-py.gguf"
    w = GGUFWriter(path, "gpt2")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 12.5)
    for name, arr in tensors.items():
        w.add_tensor(name, quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = adapter_gguf_bytes(tensors, 12.5, kind)
    assert ours == path.read_bytes()
    index = read_index_bytes(ours, "adapter.gguf")
    assert [numpy_shape(t) for t in index.tensors] == [a.shape for a in tensors.values()]


def test_iter_tensors_reads_each_tensor_and_nothing_else(tmp_path):
    data = np.arange(48, dtype=np.float32).tobytes()
    raw = gguf([kv_str("general.name", "x")], [tensor_info("b", [8], T.F32, 128), tensor_info("a", [16], T.F32, 0)],
               data[:64] + b"\x07" * 64 + data[64:96] + b"tail")
    path = tmp_path / "t.gguf"
    path.write_bytes(raw)
    got = [(info.name, bytes(b)) for info, b in iter_tensors(read_index(path))]
    assert got == [("a", data[:64]), ("b", data[64:96])]  # file order
    index = read_index(path)
    part = [t for t in index.tensors if t.name == "b"]
    assert [(info.name, bytes(b)) for info, b in iter_tensors(index, part)] == [("b", data[64:96])]


def test_tensors_split_into_two_halves_of_about_equal_bytes():
    from paw_lite.base_model import _halves_by_size

    sizes = [700, 10, 300, 300, 90, 5, 5, 1]
    infos = [TensorInfo(f"t{i}", np.array([n], np.uint64), T.F32, 0, n) for i, n in enumerate(sizes)]
    halves = _halves_by_size(infos)
    assert sorted(t.name for half in halves for t in half) == sorted(t.name for t in infos)  # each exactly once
    totals = sorted(sum(t.n_bytes for t in half) for half in halves)
    assert totals == [705, 706]


def _write(tmp_path, raw: bytes):
    path = tmp_path / "m.gguf"
    path.write_bytes(raw)
    return path


F32_16 = np.zeros(16, np.float32).tobytes()


# What the one bounded walk refuses, for models and adapters alike.
MALFORMED = {
    "data past the end": (gguf([kv_str("k", "v")], [tensor_info("a", [16], T.F32, 0)], F32_16[:40]), "tensor a .*the file has"),
    "unaligned offset": (gguf([kv_str("k", "v")], [tensor_info("a", [16], T.F32, 4)], F32_16), "offset 4 is not a multiple"),
    "duplicate key": (gguf([kv_str("k", "v"), kv_str("k", "w")], []), "metadata key 'k' appears twice"),
    "duplicate tensor": (gguf([], [tensor_info("a", [16], T.F32, 0), tensor_info("a", [16], T.F32, 64)], F32_16 * 2), "duplicate name 'a'"),
    "key not UTF-8": (gguf([kv(b"k\xff", GGUFValueType.STRING, gstr("v"))], []), "UTF-8"),
    "token not UTF-8": (gguf([kv_array("tokens", GGUFValueType.STRING, [gstr(b"ok"), gstr(b"\xc3")])], []), "not valid UTF-8"),
    "unknown value type": (gguf([kv("k", 99, b"")], []), "value type 99"),
    "huge array": (gguf([kv_array("k", GGUFValueType.STRING, [gstr("a")], count=2**40)], []), "items|strings"),
    "unknown tensor type": (gguf([], [tensor_info("a", [16], 1234, 0)], F32_16), "unknown type 1234"),
    "zero dimension": (gguf([], [tensor_info("a", [16, 0], T.F32, 0)], F32_16), r"dimensions \[16, 0\]"),
    "five dimensions": (gguf([], [tensor_info("a", [1, 1, 1, 1, 1], T.F32, 0)], F32_16), "5 dimensions"),
    "partial Q8_0 block": (gguf([], [tensor_info("a", [48], T.Q8_0, 0)], b"\0" * 64), "Q8_0 block"),
    "alignment 3": (gguf([kv_scalar("general.alignment", GGUFValueType.UINT32, 3)], []), "general.alignment is 3"),
    # The GGUF specification's type, the only one llama.cpp (gguf.cpp) and gguf-py accept: one rule
    # for every reader (the model reader once took any integer, the adapter reader UINT32 only).
    "alignment UINT64": (gguf([kv_scalar("general.alignment", GGUFValueType.UINT64, 32)], []),
                         "general.alignment has type UINT64, expected UINT32"),
    "alignment INT32": (gguf([kv_scalar("general.alignment", GGUFValueType.INT32, 32)], []),
                        "general.alignment has type INT32, expected UINT32"),
    "alignment UINT16": (gguf([kv_scalar("general.alignment", GGUFValueType.UINT16, 32)], []),
                         "general.alignment has type UINT16, expected UINT32"),
}


@pytest.mark.parametrize("raw, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_files_are_refused(tmp_path, raw, message):
    with pytest.raises(InvalidFileError, match=message):
        read_index(_write(tmp_path, raw))


@pytest.mark.parametrize("raw, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_file_in_memory_is_refused_as_its_file_is(raw, message):
    """A program's adapter.gguf is read from its bytes, by the same walk: the same errors, naming the source."""
    with pytest.raises(InvalidFileError, match=message) as exc:
        read_index_bytes(raw, "prog.paw: adapter.gguf")
    assert str(exc.value).startswith("prog.paw: adapter.gguf: ")


def test_an_alignment_other_than_32_places_the_data(tmp_path):
    """general.alignment (UINT32) moves where the data starts and what offsets must be multiples of."""
    data = np.arange(16, dtype=np.float32).tobytes()
    raw = gguf([kv_scalar("general.alignment", GGUFValueType.UINT32, 256)], [tensor_info("a", [16], T.F32, 0)], data,
               alignment=256)
    index = read_index(_write(tmp_path, raw))
    assert index.data_offset == 256 and index.fields["general.alignment"].value == 256
    assert GGUFReader(_write(tmp_path, raw)).data_offset == 256  # gguf-py places it there too
    (info, got), = iter_tensors(index)
    assert bytes(got) == data
    unaligned = gguf([kv_scalar("general.alignment", GGUFValueType.UINT32, 256)], [tensor_info("a", [16], T.F32, 64)],
                     bytes(64) + data, alignment=256)
    with pytest.raises(InvalidFileError, match="data offset 64 is not a multiple of the alignment 256"):
        read_index(_write(tmp_path, unaligned))


def test_truncation_anywhere_in_the_header_is_refused(tiny_gguf, tmp_path):
    raw = tiny_gguf.read_bytes()
    end = read_index(tiny_gguf).data_offset
    for cut in (30, 1000, end // 3, end // 2, end - 40):
        with pytest.raises(InvalidFileError):
            read_index(_write(tmp_path, raw[:cut]))


SEED_FILE = gguf(
    [kv_str("general.architecture", "gpt2"), kv_scalar("gpt2.block_count", GGUFValueType.UINT32, 2),
     kv_array("tokenizer.ggml.tokens", GGUFValueType.STRING, [gstr(t) for t in ("a", "bc", "<|endoftext|>")]),
     kv_array("tokenizer.ggml.token_type", GGUFValueType.INT32, [struct.pack("<i", t) for t in (1, 1, 3)]),
     kv_scalar("general.alignment", GGUFValueType.UINT32, 32)],
    [tensor_info("w", [32, 2], T.Q8_0, 0), tensor_info("b", [4], T.F32, 96)],
    quants.quantize(np.ones((2, 32), np.float32), T.Q8_0).tobytes() + b"\0" * 28 + np.ones(4, np.float32).tobytes())


@settings(max_examples=int(os.environ.get("PAW_LITE_FUZZ_EXAMPLES", "300")), derandomize="PAW_LITE_FUZZ_EXAMPLES" not in os.environ,
          database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, len(SEED_FILE) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(16, len(SEED_FILE)))
def test_mutated_headers_raise_only_invalid_file_error(tmp_path_factory, edits, cut):
    raw = bytearray(SEED_FILE[:cut])
    for pos, value in edits:
        if pos < len(raw):
            raw[pos] = value
    path = tmp_path_factory.mktemp("fuzz") / "f.gguf"
    path.write_bytes(bytes(raw))
    try:
        index = read_index(path)
    except InvalidFileError:
        return
    size = len(raw)
    for t in index.tensors:  # what is accepted is safe to read
        assert 0 <= t.data_offset and t.data_offset + t.n_bytes <= size
        for info, data in iter_tensors(index):
            assert len(data) == info.n_bytes


def test_token_byte_table_equals_the_per_character_map(gpt2_vocab):
    """tokenizer.py builds each token's bytes with str.translate (for load speed); it must equal
    mapping character by character through GPT-2's byte alphabet, unknown characters to '?'."""
    from paw_lite.tokenizer import _TO_LATIN1, _UNICODE_TO_BYTE, GPT2Tokenizer

    def reference(text: str) -> bytes:
        return bytes(_UNICODE_TO_BYTE.get(c, 0x3F) for c in text)

    tokens, merges, special, eos = gpt2_vocab
    tok = GPT2Tokenizer(tokens, merges, special, eos, "vocab")
    assert all(tok.token_bytes(i) == (b"" if i in special else reference(t)) for i, t in enumerate(tokens))
    for odd in ["\n", "a\u0100b", "x\u4e2dy\U0001f600", "\u00ff\u0000\u00ad", "\u0120hello"]:
        assert odd.translate(_TO_LATIN1).encode("latin-1", "replace") == reference(odd), repr(odd)
