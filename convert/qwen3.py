"""Qwen3 causal LMs from HF folders to GGUF (arch `qwen3`), tensor by tensor, without torch.

Handles the trained PAW compiler (its 64 added `<prefix_k>` tokens become CONTROL tokens) and the
stock Qwen3-4B-Instruct-2507 pseudo compiler: sharded safetensors with an index, bf16/f16/f32
weights, `config.json` in transformers 4 (`rope_theta`) or 5 (`rope_parameters`) style, tied or
untied output. Types: f32, f16, bf16, q8_0 encoded in NumPy (gguf-py); q4_k_m, q5_k_m, q6_k by
llama.cpp's quantizer from a lossless intermediate file."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, MODEL_ARCH, TensorNameMap

from paw_lite.atomic import TMP_SUFFIX, atomic_path, remove_stale_temporaries
from paw_lite.errors import InvalidFileError, ModelNotFoundError, require
from paw_lite.qwen3_layout import ARCH, Qwen3Config
from paw_lite.safetensors_file import SafetensorsFile

from .gguf_stream import TensorPlan, write_streamed
from .hf_bpe import BPEVocab, check_chat_tokens, read_bpe_vocab
from .llama_quantize import K_QUANTS, llama_quantize

log = logging.getLogger(__name__)

_T = GGMLQuantizationType
# --type name -> (type of every matrix, GGUF file type)
NUMPY_QTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (_T.F32, LlamaFileType.ALL_F32),
    "f16": (_T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (_T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (_T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
QWEN3_TYPES = (*NUMPY_QTYPES, *K_QUANTS)
# Source dtype -> the lossless intermediate type llama.cpp's quantizer reads.
_LOSSLESS = {"BF16": "bf16", "F16": "f16", "F32": "f32"}
_ELEMENT = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}


def read_rows(st: SafetensorsFile, key: str, r0: int, r1: int) -> np.ndarray:
    """Rows r0..r1 of a tensor as stored (bf16 as uint16), read with a plain file read.

    Not through the memory map: mapped pages stay in the process's RSS until unmapped, so a
    streamed 8 GB model would still show 8 GB resident (measured: benchmarks/convert_rss.py)."""
    shape = st.shape(key)
    dtype = _ELEMENT[st.dtype_name(key)]
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else int(shape[0]) if shape else 1
    if len(shape) <= 1:
        r0, r1 = 0, 1
    start, _ = st.byte_range(key)
    count = (r1 - r0) * row
    out = np.fromfile(st.path, dtype=dtype, count=count, offset=start + r0 * row * dtype.itemsize)
    if out.size != count:
        raise InvalidFileError(f"{st.path}: {key} is cut short ({out.size} of {count} values read; file changed or truncated?)")
    return out.reshape((r1 - r0, *shape[1:]) if len(shape) > 1 else shape)


class Qwen3Source:
    """The tensors of an HF Qwen3 folder under GGUF names, read lazily from memory-mapped shards."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelNotFoundError(f"{self.folder}: not a folder; pass an HF Qwen3 model folder (config.json, *.safetensors, tokenizer.json)")
        self.config = Qwen3Config.from_hf(self.folder / "config.json")
        self.files = self._open_shards()
        self.tensors = self._map_names()  # GGUF name -> (HF name, file)

    def _open_shards(self) -> dict[str, SafetensorsFile]:
        """HF tensor name -> the shard holding it (from the index, or the single model.safetensors)."""
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InvalidFileError(f"{index}: no readable weight_map: {exc}") from exc
            if not isinstance(weight_map, dict):
                raise InvalidFileError(f"{index}: weight_map is a JSON {type(weight_map).__name__}, expected an object "
                                       f"of tensor name -> shard file (re-download the index from the model's release)")
        elif (self.folder / "model.safetensors").exists():
            weight_map = None
        else:
            raise ModelNotFoundError(f"{self.folder}: no model.safetensors or model.safetensors.index.json "
                                     "(pytorch .bin checkpoints of Qwen3 are not converted; use the safetensors release)")
        shard_names = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        shards: dict[str, SafetensorsFile] = {}
        for name in shard_names:
            if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                raise InvalidFileError(f"{index}: shard name {name!r} is not a plain file name in the model folder")
            if not (self.folder / name).exists():
                raise ModelNotFoundError(f"{self.folder / name}: shard listed in {index.name} is missing (incomplete download?)")
            shards[name] = SafetensorsFile(self.folder / name)
        out: dict[str, SafetensorsFile] = {}
        for name, st in shards.items():
            for key in st.keys():
                if weight_map is not None and weight_map.get(key) != name:
                    raise InvalidFileError(f"{st.path}: holds {key}, which the index places in {weight_map.get(key)!r}")
                out[key] = st
        missing = sorted(set(weight_map or {}) - set(out))
        if missing:
            raise InvalidFileError(f"{index}: lists {missing[:3]} but no shard holds them")
        return out

    def _map_names(self) -> dict[str, tuple[str, SafetensorsFile]]:
        cfg = self.config
        names = TensorNameMap(MODEL_ARCH.QWEN3, cfg.n_layer)
        expected = cfg.tensor_shapes()
        mapped: dict[str, tuple[str, SafetensorsFile]] = {}
        lm_head: str | None = None
        for key, st in self.files.items():
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise InvalidFileError(f"{st.path}: tensor {key!r} has no Qwen3 GGUF name (not a Qwen3 checkpoint?)")
            if gguf_name == "output.weight" and cfg.tied:
                lm_head = key
                continue
            if gguf_name not in expected:
                raise InvalidFileError(f"{st.path}: tensor {key!r} ({gguf_name}) is not expected for {cfg.n_layer} layers")
            if gguf_name in mapped:
                raise InvalidFileError(f"{st.path}: {gguf_name} appears twice ({mapped[gguf_name][0]}, {key})")
            if st.shape(key) != expected[gguf_name]:
                raise InvalidFileError(f"{st.path}: {key} has shape {st.shape(key)}, expected {expected[gguf_name]} from config.json")
            if st.dtype_name(key) not in _LOSSLESS:
                raise InvalidFileError(f"{st.path}: {key} has dtype {st.dtype_name(key)}; expected BF16, F16 or F32")
            mapped[gguf_name] = (key, st)
        missing = [n for n in expected if n not in mapped]
        if missing:
            hint = " (config.json says tie_word_embeddings is false but there is no lm_head.weight)" if "output.weight" in missing else ""
            raise InvalidFileError(f"{self.folder}: missing tensors {missing[:5]}{hint}")
        if lm_head is not None:
            self._check_tied(lm_head)
        return {n: mapped[n] for n in expected}  # GGUF order: embedding, norms, then block by block

    def _check_tied(self, lm_head: str) -> None:
        """A tied model may still store lm_head; it must then equal the embedding (transformers ignores it)."""
        emb_key, emb = next((k, st) for k, st in self.files.items() if k.endswith("embed_tokens.weight"))
        head = self.files[lm_head]
        rows, step = head.shape(lm_head)[0], 4096
        same = head.shape(lm_head) == emb.shape(emb_key) and head.dtype_name(lm_head) == emb.dtype_name(emb_key) and all(
            np.array_equal(read_rows(head, lm_head, r, min(rows, r + step)), read_rows(emb, emb_key, r, min(rows, r + step)))
            for r in range(0, rows, step))
        if not same:
            raise InvalidFileError(f"{head.path}: config.json says tie_word_embeddings but {lm_head} differs from {emb_key}")
        log.info("%s: lm_head.weight equals the embedding (tied): not written", head.path)

    def dtype_names(self) -> set[str]:
        return {st.dtype_name(key) for key, st in self.tensors.values()}

    def plans(self, matrix_type: GGMLQuantizationType) -> list[TensorPlan]:
        """One plan per tensor: norms stay F32 (as llama.cpp writes them), matrices take `matrix_type`."""
        out = []
        for gguf_name, (key, st) in self.tensors.items():
            shape = st.shape(key)
            qtype = matrix_type if len(shape) == 2 else GGMLQuantizationType.F32

            def rows(r0: int, r1: int, key: str = key, st: SafetensorsFile = st) -> tuple[np.ndarray, str]:
                return read_rows(st, key, r0, r1), st.dtype_name(key)

            out.append(TensorPlan(gguf_name, shape, qtype, rows))
        return out


def _add_metadata(w: GGUFWriter, cfg: Qwen3Config, vocab: BPEVocab, name: str, file_type: LlamaFileType) -> None:
    w.add_name(name)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    # Needed whenever head_dim != n_embd / n_head (Qwen3-4B: 128 vs 80); written always.
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_file_type(int(file_type))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id is not None:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def _write_gguf(source: Qwen3Source, vocab: BPEVocab, out: Path, qtype: str, on_tensor: Callable[[str], None] | None) -> None:
    matrix_type, file_type = NUMPY_QTYPES[qtype]
    with atomic_path(out) as tmp:
        w = GGUFWriter(tmp, ARCH)
        _add_metadata(w, source.config, vocab, source.folder.name, file_type)
        write_streamed(w, source.plans(matrix_type), on_tensor)
        w.close()


def preflight(source: Qwen3Source, qtype: str) -> BPEVocab:
    """What can be checked before any tensor is written (a K-quant of a 4B model writes an 8 GB
    intermediate and quantizes it first): the type, llama.cpp for K-quants, the tokenizer and its
    chat tokens. Returns the vocabulary to write."""
    if qtype not in QWEN3_TYPES:
        raise InvalidFileError(f"--type {qtype!r}: Qwen3 converts to one of {', '.join(QWEN3_TYPES)}")
    if qtype not in NUMPY_QTYPES:
        require("llama_cpp", "compile")
    vocab = read_bpe_vocab(source.folder, source.config.n_vocab)
    check_chat_tokens(vocab.tokens, vocab.token_types, source.folder / "tokenizer.json",
                      "use the tokenizer files of the published Qwen3 models")
    return vocab


def convert_qwen3(src_dir: str | os.PathLike[str], out: str | os.PathLike[str], qtype: str = "q8_0",
                  on_tensor: Callable[[str], None] | None = None,
                  on_pass: Callable[[int], None] | None = None) -> Path:
    """Convert an HF Qwen3 folder to a GGUF file of type `qtype` (one of QWEN3_TYPES); returns `out`.

    `on_tensor(name)` is called with the GGUF name after each tensor is written. K-quants first write
    a lossless intermediate GGUF (the source dtype) beside `out`, then run llama.cpp's quantizer on
    it: a second pass, announced by `on_pass(n_tensors)`, in which `on_tensor(name)` is called as the
    quantizer starts each tensor."""
    out = Path(out)
    qtype = qtype.lower()
    source = Qwen3Source(src_dir)
    vocab = preflight(source, qtype)
    if qtype in NUMPY_QTYPES:
        _write_gguf(source, vocab, out, qtype, on_tensor)
        return out
    dtypes = source.dtype_names()
    base = _LOSSLESS[dtypes.pop()] if len(dtypes) == 1 else "f32"
    out.parent.mkdir(parents=True, exist_ok=True)
    # A killed conversion leaves its intermediate (GBs for a 4B model): swept by the next one.
    remove_stale_temporaries(out.parent, prefix=f".{out.name}.")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent) as tmp_dir:
        intermediate = Path(tmp_dir) / f"intermediate-{base}.gguf"
        _write_gguf(source, vocab, intermediate, base, on_tensor)

        def on_quantize(name: str, index: int, count: int) -> None:
            if index == 1 and on_pass is not None:  # llama.cpp counts its tensors from 1
                on_pass(count)
            if on_tensor is not None:
                on_tensor(name)

        llama_quantize(intermediate, out, qtype, on_tensor=on_quantize)
    return out
