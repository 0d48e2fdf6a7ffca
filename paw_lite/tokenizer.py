"""Byte-level BPE (GPT-2's and Qwen's), built with `tokenizers` from a model file's own token list,
token types and merges.

A prompt gets the ids the official runtime gives it (programasweights 0.4.14, runtime_llamacpp.py:
llama.cpp's `tokenize(..., add_bos=False, special=True)` on the template's prefix, then on input +
suffix), with one deliberate difference: user text is always encoded as plain text, so only the
program's template may hold control tokens (`<|endoftext|>`, `<|im_start|>`, ...) and the added
tokens llama.cpp also matches (USER_DEFINED ones, Qwen's `<think>` and `</think>`).
tests/test_prompt_tokens.py checks this against llama.cpp on the real GPT-2 vocabulary,
tests/test_qwen_tokens.py on the real Qwen vocabulary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from gguf import TokenType
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from .errors import InvalidFileError
from .families import COMPACT, FAMILIES, Family
from .gguf_file import get_field, get_int, get_str

# llama.cpp splits text before BPE by the regex `tokenizer.ggml.pre` names (src/llama-vocab.cpp).
# GPT-2's is named "gpt-2" by GPT-2 conversions (llama.cpp's convert_hf_to_gguf.py, whose
# ggml-vocab-gpt-2.gguf carries it, and `paw-lite convert gpt2`); Qwen2's and Qwen3's "qwen2".
GPT2_PRE = COMPACT.pre_tokenizer
# The qwen2 split as Qwen's tokenizer.json writes it; llama.cpp spells the case-insensitive group
# out ('[sS]|...'), the same language.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex is ByteLevel's own


def _qwen2_split() -> pre_tokenizers.PreTokenizer:
    # No NFC normaliser, unlike Qwen's tokenizer.json: llama.cpp (the official runtime) has none.
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {"gpt-2": _gpt2_split, "qwen2": _qwen2_split}
# Token types (llama.cpp's, gguf.TokenType) matched in a template as one token: llama.cpp matches
# CONTROL and UNKNOWN ones when asked to parse special tokens, USER_DEFINED ones always.
_MATCHED_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED)
# Token types llama.cpp's detokenize (special=False, as the official runtime calls it) writes as
# their raw text; NORMAL and BYTE tokens are byte-level decoded, every other type writes nothing.
_RAW_TEXT_TYPES = (TokenType.USER_DEFINED,)
_BYTE_LEVEL_TYPES = (TokenType.NORMAL, TokenType.BYTE)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the alphabet of its vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}
# The same map for str.translate; characters below 256 outside the alphabet become "?", and those
# above 256 outside it are left for encode("latin-1", "replace") to turn into "?".
_TO_LATIN1 = str.maketrans({**{chr(i): "?" for i in range(256)}, **{c: chr(b) for c, b in _UNICODE_TO_BYTE.items()}})


class BPETokenizer:
    """Encode and decode byte-level BPE token ids. `special_ids` are the control tokens (e.g.
    <|endoftext|>), `user_defined_ids` the added tokens llama.cpp writes as text (Qwen's <think>):
    both are matched in templates only (`special`). `eos_id` is the file's EOS; `eos_ids` every
    token that ends an output (the file's first, then the family's others)."""

    def __init__(self, tokens: list[str], merges: list[str], special_ids: list[int], eos_id: int, source: Path | str,
                 *, pre: str = GPT2_PRE, user_defined_ids: list[int] = (), silent_ids: list[int] = (),
                 eos_ids: tuple[int, ...] = ()):
        if not 0 <= eos_id < len(tokens):
            raise InvalidFileError(f"{source}: eos token id {eos_id} is outside the vocabulary of {len(tokens)} tokens")
        if pre not in PRE_TOKENIZERS:
            raise InvalidFileError(f"{source}: pre-tokenizer {pre!r} is not one paw_lite implements "
                                   f"({', '.join(PRE_TOKENIZERS)})")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise InvalidFileError(f"{source}: the token list holds duplicate tokens")
        try:
            pairs = [tuple(m.split(" ", 1)) for m in merges]
            bpe = models.BPE(vocab=vocab, merges=pairs)
        except Exception as exc:  # tokenizers raises its own untyped errors on bad vocab/merges
            raise InvalidFileError(f"{source}: the BPE vocabulary or merges are malformed: {exc}") from exc
        self._tok = Tokenizer(bpe)
        self._tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
        self._tok.decoder = decoders.ByteLevel()
        self.n_vocab = len(tokens)
        self.pre = pre
        self.eos_id = eos_id
        self.eos_ids = tuple(dict.fromkeys((eos_id, *eos_ids)))
        for i in self.eos_ids:
            if not 0 <= i < len(tokens):
                raise InvalidFileError(f"{source}: end-of-output token id {i} is outside the vocabulary of {len(tokens)} tokens")
        self.special = {tokens[i]: i for i in (*special_ids, *user_defined_ids)}
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True))) if self.special else None
        control, raw = set(special_ids) | set(silent_ids), set(user_defined_ids)
        # translate + latin-1: each character to its byte, unknown ones to "?" (10x faster per char)
        self._bytes = [b"" if i in control else tok.encode("utf-8") if i in raw
                       else tok.translate(_TO_LATIN1).encode("latin-1", "replace") for i, tok in enumerate(tokens)]
        # Matched tokens are never produced from user text, so plain text needs at least
        # len(bytes) / max_token_bytes tokens (used to refuse huge inputs before tokenizing them).
        self.max_token_bytes = max(1, max((len(b) for i, b in enumerate(self._bytes) if i not in raw), default=1))

    @classmethod
    def from_gguf(cls, reader, path: Path, family: Family | None = None) -> "BPETokenizer":
        """The tokenizer of an interpreter GGUF of `family` (whose pre-tokenizer the file must name);
        None: the family of the file's architecture (GPT-2's for any other, or none: its
        pre-tokenizer check then says what is wrong)."""
        if family is None:
            arch = get_field(reader, "general.architecture", path, default=None)
            family = next((f for f in FAMILIES.values() if f.arch == arch), COMPACT)
        model = get_str(reader, "tokenizer.ggml.model", path)
        if model != "gpt2":
            raise InvalidFileError(f"{path}: tokenizer.ggml.model is {model!r}, expected 'gpt2' (byte-level BPE)")
        tokens = get_field(reader, "tokenizer.ggml.tokens", path)
        merges = get_field(reader, "tokenizer.ggml.merges", path)
        types = get_field(reader, "tokenizer.ggml.token_type", path, default=None)
        for key, value, kind in (("tokens", tokens, str), ("merges", merges, str), ("token_type", types, int)):
            if value is not None and not (isinstance(value, list) and all(isinstance(v, kind) for v in value)):
                raise InvalidFileError(f"{path}: tokenizer.ggml.{key} is not a list of {kind.__name__}")
        if types is not None and len(types) != len(tokens):
            raise InvalidFileError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
        eos = get_int(reader, "tokenizer.ggml.eos_token_id", path)
        pre = _check_pre(reader, path, family)
        _check_added_tokens(reader, path)
        return cls.from_token_types(tokens, types or [], merges, eos, path, pre, family)

    @classmethod
    def from_token_types(cls, tokens: list[str], types: list[int], merges: list[str], eos_id: int, source: Path | str,
                         pre: str, family: Family) -> "BPETokenizer":
        """From llama.cpp's token types (gguf.TokenType per token); the family's EOS tokens that the
        vocabulary holds end an output too."""
        control = [i for i, t in enumerate(types) if t in _MATCHED_TYPES and t not in _RAW_TEXT_TYPES]
        user_defined = [i for i, t in enumerate(types) if t in _RAW_TEXT_TYPES]
        ids = {tok: i for i, tok in enumerate(tokens)}
        ends = tuple(ids[name] for name in family.eos_tokens if name in ids)
        # Other types (UNUSED: padding rows) are never matched and write nothing, as in llama.cpp.
        silent = [i for i, t in enumerate(types) if t not in _MATCHED_TYPES and t not in _BYTE_LEVEL_TYPES]
        return cls(tokens, merges, control, eos_id, source, pre=pre, user_defined_ids=user_defined, silent_ids=silent,
                   eos_ids=ends)

    @classmethod
    def from_hf_dir(cls, folder: Path) -> "BPETokenizer":
        """A GPT-2 tokenizer from an HF folder."""
        return cls(*hf_vocab(folder))

    @classmethod
    def from_hf_qwen_dir(cls, folder: Path, n_rows: int, family: Family) -> "BPETokenizer":
        """A Qwen tokenizer from an HF folder, with the token types `paw-lite convert qwen3` writes."""
        from .convert.hf_bpe import read_bpe_vocab

        vocab = read_bpe_vocab(folder, n_rows)
        return cls.from_token_types(vocab.tokens, vocab.token_types, vocab.merges, vocab.eos_id, folder / "tokenizer.json",
                                    family.pre_tokenizer, family)

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of text with no special-token recognition (for user input)."""
        if not text:
            return []
        return self._tok.encode(text, add_special_tokens=False).ids

    def _segments(self, text: str) -> list[str | int]:
        if self._special_re is None:
            return [text]
        out: list[str | int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            out += [text[pos:m.start()], self.special[m.group()]]
            pos = m.end()
        out.append(text[pos:])
        return out

    def _encode_segments(self, segments: list[str | int]) -> list[int]:
        ids: list[int] = []
        run = ""
        for seg in segments + [-1]:
            if isinstance(seg, str):
                run += seg
                continue
            ids += self.encode_plain(run)
            run = ""
            if seg >= 0:
                ids.append(seg)
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of trusted text (a template), control tokens recognised, no BOS."""
        return self._encode_segments(self._segments(text))

    def encode_prompt(self, prefix: str, user_input: str, suffix: str) -> list[int]:
        """Ids of a filled template as the official runtime tokenizes it: the prefix alone (it is
        evaluated once and cached), then input + suffix as one string, so an input starting with a
        newline does not merge with the prefix's last newline. Control tokens are recognised in the
        template parts only; the official runtime also reads them in the input."""
        return self.encode(prefix) + self._encode_segments([user_input] + self._segments(suffix))

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def decode(self, ids: list[int]) -> str:
        """UTF-8 text of the ids, invalid sequences replaced, control tokens dropped (as llama.cpp's
        detokenize does it for the official runtime: added USER_DEFINED tokens are written as text)."""
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")


GPT2Tokenizer = BPETokenizer  # its name while GPT-2 was the only family


def _check_pre(reader, path: Path, family: Family) -> str:
    """The file's pre-tokenizer, which must be its family's."""
    pre = get_field(reader, "tokenizer.ggml.pre", path, default=None)
    want = family.pre_tokenizer
    if pre == want:
        return pre
    said = "is missing" if pre is None else f"is {pre!r}"
    how = ("llama.cpp then splits text with its 'default' pre-tokenizer" if pre is None
           else "llama.cpp splits text with that model's pre-tokenizer")
    raise InvalidFileError(f"{path}: tokenizer.ggml.pre {said}, expected {want!r}: {how}, not {family.arch}'s, so its "
                           f"token ids would differ from paw_lite's. Convert the interpreter again from its HF folder "
                           f"with `{family.convert_command}`, which writes {want!r}")


# llama.cpp adds a BOS (EOS) token around a prompt when the caller asks for special tokens and the file
# sets these keys. The official runtime never asks (`tokenize(..., add_bos=False)`, which is llama.cpp's
# add_special=false), so under it these keys change nothing, whatever their value: paw_lite adds no
# BOS or EOS either, which tests/test_prompt_tokens.py checks on a file that sets them to true.
_ADDED_TOKEN_KEYS = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token")


def _check_added_tokens(reader, path: Path) -> None:
    for key in _ADDED_TOKEN_KEYS:
        value = get_field(reader, key, path, default=False)
        if not isinstance(value, (bool, np.bool_)):  # llama.cpp refuses a file whose key is not a bool
            raise InvalidFileError(f"{path}: metadata key {key!r} is {value!r}, expected true or false")


def hf_vocab(folder: Path) -> tuple[list[str], list[str], list[int], int, Path]:
    """(tokens, merges, special ids, eos id, source) of an HF GPT-2 tokenizer: `tokenizer.json`,
    or `vocab.json` + `merges.txt`."""
    tj = folder / "tokenizer.json"
    try:
        if tj.exists():
            data = json.loads(tj.read_text(encoding="utf-8"))
            vocab, merges = data["model"]["vocab"], data["model"]["merges"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
            added = {a["content"]: a["id"] for a in data.get("added_tokens", []) if a.get("special")}
            source = tj
        else:
            source = folder / "vocab.json"
            vocab = json.loads(source.read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [ln for ln in lines if ln and not ln.startswith("#version")]
            added = {"<|endoftext|>": vocab["<|endoftext|>"]} if "<|endoftext|>" in vocab else {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidFileError(f"{folder}: no readable GPT-2 tokenizer (tokenizer.json, or vocab.json + merges.txt): {exc}") from exc
    for content, idx in added.items():
        vocab.setdefault(content, idx)
    tokens = [""] * len(vocab)
    for tok, idx in vocab.items():
        if not isinstance(idx, int) or not 0 <= idx < len(tokens):
            raise InvalidFileError(f"{source}: token {tok!r} has id {idx}, outside 0..{len(tokens) - 1}")
        tokens[idx] = tok
    eos = added.get("<|endoftext|>", len(tokens) - 1)
    return tokens, merges, sorted(added.values()), eos, source
