"""A Qwen-family byte-level BPE tokenizer from an HF folder, as the GGUF tokenizer metadata llama.cpp reads.

Sources: `tokenizer.json` (vocabulary, merges, added tokens, pre-tokenizer), `tokenizer_config.json`
(bos/eos/pad, added-token flags, maybe the chat template), `chat_template.jinja` (where newer
transformers write the template; it wins over tokenizer_config.json, as in transformers), and
`config.json` for ids the tokenizer files leave out."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import TokenType

from paw_lite.errors import IncompatibleModelError, InvalidFileError

log = logging.getLogger(__name__)

# The split llama.cpp's `qwen2` pre-tokenizer implements. A tokenizer.json with another split would
# tokenize differently in llama.cpp: refuse it rather than write a file that disagrees with HF.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
MAX_TOKENIZER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class BPEVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    add_bos: bool
    chat_template: str | None

    def ids_of_type(self, token_type: TokenType) -> list[int]:
        return [i for i, t in enumerate(self.token_types) if t == token_type]


CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def check_chat_tokens(tokens: list[str], types: list[int], where: Path, fix: str) -> None:
    """The compilers' chat prompts are built from these: each must be one CONTROL token."""
    ids = {t: i for i, t in enumerate(tokens)}
    for tok in CHAT_TOKENS:
        if tok not in ids or types[ids[tok]] != TokenType.CONTROL:
            raise InvalidFileError(f"{where}: chat token {tok} is missing or not a CONTROL token (the compilers' chat "
                                   f"prompts need it): {fix}")


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise InvalidFileError(f"{path}: {path.stat().st_size} bytes is over the {MAX_TOKENIZER_BYTES}-byte limit for a tokenizer file")
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidFileError(f"{path}: cannot read: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidFileError(f"{path}: not valid JSON: {exc}") from exc


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _check_pre_tokenizer(data: dict, path: Path) -> None:
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    levels = [s for s in steps if s.get("type") == "ByteLevel"]
    pattern = (splits[0].get("pattern") or {}).get("Regex") if splits else None
    if pattern != QWEN2_SPLIT or len(levels) != 1:
        raise IncompatibleModelError(
            f"{path}: pre-tokenizer is not Qwen2's (Split on the qwen2 regex + ByteLevel); found "
            f"{[s.get('type') for s in steps]} with pattern {pattern!r}. Only Qwen-family tokenizers are converted")
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise IncompatibleModelError(f"{path}: tokenizer model is {model.get('type')!r} (byte_fallback "
                                     f"{model.get('byte_fallback')}); expected byte-level BPE without byte fallback")


def _chat_template(folder: Path, tok_cfg: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise InvalidFileError(f"{folder / 'tokenizer_config.json'}: chat_template is {type(template).__name__}, expected a string")
    return template


def read_bpe_vocab(folder: Path, n_rows: int) -> BPEVocab:
    """The tokenizer of an HF Qwen folder, padded with `[PAD{i}]` (UNUSED) up to `n_rows` embedding rows."""
    tj_path = folder / "tokenizer.json"
    if not tj_path.exists():
        raise InvalidFileError(f"{folder}: no tokenizer.json (the converter needs the fast tokenizer file)")
    data = _read_json(tj_path)
    if not isinstance(data, dict):
        raise InvalidFileError(f"{tj_path}: not a tokenizer.json object")
    _check_pre_tokenizer(data, tj_path)
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = _read_json(cfg_path) if cfg_path.exists() else {}
    model_cfg = _read_json(folder / "config.json") if (folder / "config.json").exists() else {}
    try:
        vocab: dict[str, int] = data["model"]["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        added = [(int(a["id"]), str(a["content"]), bool(a.get("special"))) for a in data.get("added_tokens", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidFileError(f"{tj_path}: malformed vocabulary, merges or added_tokens: {exc}") from exc

    n_tokens = max([*vocab.values(), *(a[0] for a in added)], default=-1) + 1
    if n_tokens > n_rows:
        raise IncompatibleModelError(f"{tj_path}: tokenizer has ids up to {n_tokens - 1} but the model's embedding has {n_rows} rows")
    tokens: list[str | None] = [None] * n_rows
    types = [int(TokenType.UNUSED)] * n_rows
    for text, idx in vocab.items():
        if not isinstance(idx, int) or idx < 0:
            raise InvalidFileError(f"{tj_path}: token {text!r} has id {idx!r}")
        tokens[idx], types[idx] = text, int(TokenType.NORMAL)
    for idx, text, special in added:
        if tokens[idx] is not None and tokens[idx] != text:
            raise InvalidFileError(f"{tj_path}: added token {text!r} has id {idx}, already taken by {tokens[idx]!r}")
        # Special added tokens (chat markers, <prefix_k>) are CONTROL: llama.cpp matches them only when
        # asked to parse special tokens, like HF. Non-special added tokens (<think>) are USER_DEFINED.
        tokens[idx], types[idx] = text, int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    padded = sum(t is None for t in tokens)
    if padded:
        log.info("%s: %d embedding rows have no token; written as [PAD<id>] (UNUSED)", tj_path, padded)
    final = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    if len(set(final)) != len(final):
        raise InvalidFileError(f"{tj_path}: the vocabulary holds duplicate tokens")

    ids = {t: i for i, t in enumerate(final) if types[i] != TokenType.UNUSED}

    def special_id(name: str) -> int | None:
        content = _token_content(tok_cfg.get(name))
        if content is not None:
            if content not in ids:
                raise InvalidFileError(f"{cfg_path}: {name} {content!r} is not in the vocabulary")
            return ids[content]
        value = model_cfg.get(f"{name}_id")
        if isinstance(value, list):  # generation-style lists: the first is the end-of-turn token
            value = value[0] if value else None
        if value is not None and not (isinstance(value, int) and 0 <= value < n_rows):
            raise InvalidFileError(f"{folder / 'config.json'}: {name}_id {value!r} is outside the vocabulary")
        return value

    eos = special_id("eos_token")
    if eos is None:
        raise InvalidFileError(f"{folder}: no eos token in tokenizer_config.json or config.json")
    add_bos = tok_cfg.get("add_bos_token", False)
    return BPEVocab(tokens=final, token_types=types, merges=merges, bos_id=special_id("bos_token"), eos_id=eos,
                    pad_id=special_id("pad_token"), add_bos=bool(add_bos), chat_template=_chat_template(folder, tok_cfg))
