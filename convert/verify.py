"""Check an already-converted GGUF (ours, the official `gpt2-q8_0.gguf`, a community Qwen3 GGUF) for the
role it is meant to play, from its header alone: architecture, every tensor's shape against the
hyperparameters, the tokenizer, and for the trained compiler its 64 `<prefix_k>` CONTROL tokens."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gguf import TokenType

from paw_lite.errors import IncompatibleModelError, InvalidFileError
from paw_lite.gpt2_layout import GPT2Config

from .gguf_meta import GGUFMeta, read_gguf_meta
from .hf_bpe import check_chat_tokens
from .qwen3 import Qwen3Config

ROLES = ("interpreter", "compiler", "pseudo_compiler")
N_PREFIX = 64


def prefix_token_ids(tokens: list[str], types: list[int], path: Path, n: int = N_PREFIX) -> list[int]:
    """Ids of `<prefix_1>`..`<prefix_n>`: all present, consecutive, CONTROL."""
    ids = {t: i for i, t in enumerate(tokens)}
    missing = [f"<prefix_{k}>" for k in range(1, n + 1) if f"<prefix_{k}>" not in ids]
    if missing:
        raise IncompatibleModelError(f"{path}: the trained compiler needs {n} added tokens <prefix_1>..<prefix_{n}>; "
                                     f"missing {missing[:3]}{' …' if len(missing) > 3 else ''} (is this the stock Qwen3?)")
    out = [ids[f"<prefix_{k}>"] for k in range(1, n + 1)]
    if out != list(range(out[0], out[0] + n)):
        raise InvalidFileError(f"{path}: <prefix_k> ids are not consecutive: {out[:3]} … {out[-3:]}")
    bad = [tokens[i] for i in out if types[i] != TokenType.CONTROL]
    if bad:
        raise InvalidFileError(f"{path}: {bad[:3]} are not CONTROL tokens (type {types[out[0]]}); llama.cpp would "
                               "not match them as special tokens. Re-convert with `paw-lite convert qwen3`")
    return out


_MISSING = object()


def _get(meta: GGUFMeta, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = meta.fields.get(key, default)
    if value is _MISSING:
        raise InvalidFileError(f"{meta.path}: metadata key {key!r} is missing")
    if value is not default and (isinstance(value, bool) and kind is not bool or not isinstance(value, kind)):
        raise InvalidFileError(f"{meta.path}: metadata key {key!r} is {str(value)[:60]!r}, expected {kind}")
    return value


def get_int(meta: GGUFMeta, key: str, path: Path, default: Any = _MISSING) -> int:
    return _get(meta, key, int, default)


def get_float(meta: GGUFMeta, key: str, path: Path, default: Any = _MISSING) -> float:
    return float(_get(meta, key, (int, float), default))


def get_str(meta: GGUFMeta, key: str, path: Path, default: Any = _MISSING) -> str:
    return _get(meta, key, str, default)


def get_field(meta: GGUFMeta, key: str, path: Path, default: Any = _MISSING) -> Any:
    return _get(meta, key, object, default)


def _qwen3_config(reader, path: Path, n_vocab: int) -> Qwen3Config:
    a = "qwen3"
    n_embd, n_head = get_int(reader, f"{a}.embedding_length", path), get_int(reader, f"{a}.attention.head_count", path)
    return Qwen3Config(
        n_vocab=n_vocab, n_ctx=get_int(reader, f"{a}.context_length", path), n_embd=n_embd,
        n_ff=get_int(reader, f"{a}.feed_forward_length", path), n_layer=get_int(reader, f"{a}.block_count", path),
        n_head=n_head, n_head_kv=get_int(reader, f"{a}.attention.head_count_kv", path, default=n_head),
        head_dim=get_int(reader, f"{a}.attention.key_length", path, default=n_embd // n_head),
        eps=get_float(reader, f"{a}.attention.layer_norm_rms_epsilon", path),
        rope_theta=get_float(reader, f"{a}.rope.freq_base", path, default=10000.0), tied=True)


def _check_qwen3(reader, path: Path, role: str) -> dict[str, Any]:
    if get_str(reader, "tokenizer.ggml.model", path) != "gpt2" or get_str(reader, "tokenizer.ggml.pre", path, default="") != "qwen2":
        raise InvalidFileError(f"{path}: tokenizer is {get_str(reader, 'tokenizer.ggml.model', path)!r} / pre "
                               f"{get_str(reader, 'tokenizer.ggml.pre', path, default='')!r}, expected 'gpt2' / 'qwen2' (Qwen byte-level BPE)")
    tokens = get_field(reader, "tokenizer.ggml.tokens", path)
    types = get_field(reader, "tokenizer.ggml.token_type", path)
    if len(types) != len(tokens) or not get_field(reader, "tokenizer.ggml.merges", path):
        raise InvalidFileError(f"{path}: {len(types)} token types for {len(tokens)} tokens, or no merges")
    eos = get_int(reader, "tokenizer.ggml.eos_token_id", path)
    if not 0 <= eos < len(tokens):
        raise InvalidFileError(f"{path}: eos token id {eos} is outside the {len(tokens)}-token vocabulary")
    check_chat_tokens(tokens, types, path, "convert the model's HF folder with `paw-lite convert qwen3`")
    cfg = _qwen3_config(reader, path, len(tokens))
    infos = reader.tensors
    expected = cfg.tensor_shapes()
    tied = "output.weight" not in infos
    if not tied:
        expected["output.weight"] = (cfg.n_vocab, cfg.n_embd)
    missing, unknown = sorted(set(expected) - set(infos)), sorted(set(infos) - set(expected))
    if missing or unknown:
        raise InvalidFileError(f"{path}: tensors do not match a {cfg.n_layer}-layer Qwen3: missing {missing[:4]}, unexpected {unknown[:4]}")
    for name, want in expected.items():
        if infos[name].shape != want:
            raise InvalidFileError(f"{path}: {name} has shape {infos[name].shape}, expected {want}")
    info: dict[str, Any] = {"arch": "qwen3", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "head_dim": cfg.head_dim,
                            "n_vocab": cfg.n_vocab, "tied_output": tied, "eos_id": eos,
                            "chat_template": get_field(reader, "tokenizer.chat_template", path, default=None) is not None}
    if role == "compiler":
        prefix = prefix_token_ids(tokens, types, path)
        info["prefix_ids"] = [prefix[0], prefix[-1]]
    elif role == "pseudo_compiler" and not info["chat_template"]:
        raise InvalidFileError(f"{path}: no tokenizer.chat_template; the pseudo compiler renders prompts with its chat template")
    return info


def gpt2_config(reader: GGUFMeta, path: Path) -> GPT2Config:
    """The interpreter's hyperparameters from its GGUF keys (validated)."""
    if get_str(reader, "tokenizer.ggml.model", path) != "gpt2":
        raise InvalidFileError(f"{path}: tokenizer.ggml.model is not 'gpt2' (byte-level BPE)")
    tokens = get_field(reader, "tokenizer.ggml.tokens", path)
    n_embd = get_int(reader, "gpt2.embedding_length", path)
    return GPT2Config(n_vocab=len(tokens), n_ctx=get_int(reader, "gpt2.context_length", path), n_embd=n_embd,
                      n_head=get_int(reader, "gpt2.attention.head_count", path), n_layer=get_int(reader, "gpt2.block_count", path),
                      n_ff=get_int(reader, "gpt2.feed_forward_length", path, default=4 * n_embd),
                      eps=get_float(reader, "gpt2.attention.layer_norm_epsilon", path)).validate(path)


def _check_gpt2(reader: GGUFMeta, path: Path) -> dict[str, Any]:
    cfg = gpt2_config(reader, path)
    eos = get_int(reader, "tokenizer.ggml.eos_token_id", path)
    if not 0 <= eos < cfg.n_vocab:
        raise InvalidFileError(f"{path}: eos token id {eos} is outside the {cfg.n_vocab}-token vocabulary")
    expected = cfg.tensor_shapes()
    if "output.weight" in reader.tensors:
        expected["output.weight"] = (cfg.n_vocab, cfg.n_embd)
    missing, unknown = sorted(set(expected) - set(reader.tensors)), sorted(set(reader.tensors) - set(expected))
    if missing or unknown:
        raise InvalidFileError(f"{path}: tensors do not match a {cfg.n_layer}-layer GPT-2: missing {missing[:4]}, unexpected {unknown[:4]}")
    for name, want in expected.items():
        if reader.tensors[name].shape != want:
            raise InvalidFileError(f"{path}: {name} has shape {reader.tensors[name].shape}, expected {want}")
    return {"arch": "gpt2", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_ctx": cfg.n_ctx, "n_vocab": cfg.n_vocab, "eos_id": eos}


def verify_gguf(path: str | os.PathLike[str], role: str, interpreter_arch: str | None = "gpt2") -> dict[str, Any]:
    """Check a GGUF for `role` (one of ROLES); returns a summary, raises with the first problem found.
    interpreter_arch: the interpreter's architecture, 'gpt2' (Compact programs) or 'qwen3' (Standard)."""
    path = Path(path)
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    reader = read_gguf_meta(path)
    arch = get_str(reader, "general.architecture", path)
    want = (interpreter_arch or "gpt2") if role == "interpreter" else "qwen3"
    if arch != want:
        raise IncompatibleModelError(f"{path}: architecture is {arch!r}; the {role.replace('_', ' ')} must be {want!r}")
    info = _check_gpt2(reader, path) if want == "gpt2" else _check_qwen3(reader, path, role)
    kinds: dict[str, int] = {}
    for t in reader.tensors.values():
        kinds[t.qtype.name] = kinds.get(t.qtype.name, 0) + 1
    info.update(role=role, tensor_types=kinds, n_tensors=len(reader.tensors), bytes=os.path.getsize(path))
    return info
