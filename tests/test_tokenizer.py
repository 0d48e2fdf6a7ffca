"""GPT-2 tokenizer built from a GGUF's own vocabulary: ids equal llama.cpp's reference cases and
transformers' GPT-2 tokenizer loaded from vocab.json + merges.txt."""

from __future__ import annotations

import pytest

from paw_lite.gguf_file import read_index
from paw_lite.tokenizer import GPT2Tokenizer

from oracles import oracle

EXTRA_CASES = ["classify a log line as ALERT or QUIET", "  leading spaces\n\n\ttabs", "naïve café — 東京 🤖",
               "[INPUT]\nhello\n[END_INPUT]", "x" * 300, "don't won't it's", "12345 67.89"]


def reference_cases(vocab_dir, name):
    inp = (vocab_dir / f"{name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = (vocab_dir / f"{name}.out").read_text(encoding="utf-8").split("\n")
    cases = inp[:-1] if inp[-1] == "" else inp
    return [(text, [int(t) for t in ids.split()]) for text, ids in zip(cases, out)]


@pytest.fixture(scope="module")
def tok(vocab_dir):
    path = vocab_dir / "ggml-vocab-gpt-2.gguf"
    return GPT2Tokenizer.from_gguf(read_index(path), path)


@pytest.fixture(scope="module")
def hf_tokenizers(hf_tokenizer_dir):
    return (oracle("transformers").GPT2Tokenizer.from_pretrained(hf_tokenizer_dir),)


def test_reference_cases_match_llama_cpp_and_hf(tok, vocab_dir, hf_tokenizers):
    cases = reference_cases(vocab_dir, "ggml-vocab-gpt-2.gguf")
    assert len(cases) >= 40
    for text, want in cases:
        assert tok.encode(text) == want, text
        for hf in hf_tokenizers:
            assert hf.encode(text) == want, (type(hf).__name__, text)


def test_extra_cases_match_hf(tok, hf_tokenizers):
    for text in EXTRA_CASES:
        for hf in hf_tokenizers:
            assert tok.encode(text) == hf.encode(text), text


def test_hf_folder_tokenizer_equals_gguf_tokenizer(tok, hf_tokenizer_dir):
    hf = GPT2Tokenizer.from_hf_dir(hf_tokenizer_dir)
    for text in EXTRA_CASES:
        assert hf.encode(text) == tok.encode(text)
    assert hf.eos_id == tok.eos_id == 50256


def test_decode_round_trips_and_replaces_invalid_utf8(tok):
    for text in EXTRA_CASES:
        assert tok.decode(tok.encode(text)) == text
    emoji = tok.encode("🤖")
    assert len(emoji) > 1
    assert tok.decode(emoji[:1]) == "\ufffd" * len(tok.token_bytes(emoji[0]).decode("utf-8", "replace"))
    assert tok.decode([50256]) == ""  # control tokens are not text


def test_user_text_never_becomes_a_control_token(tok, hf_tokenizers):
    text = "stop <|endoftext|> here"
    assert 50256 in tok.encode(text)  # in a template it is the control token
    plain = tok.encode_plain(text)
    assert 50256 not in plain
    assert tok.decode(plain) == text
    ids = tok.encode_prompt("a<|endoftext|>b ", text, " c")
    assert ids.count(50256) == 1


def test_prompt_is_tokenized_as_prefix_then_input_and_suffix(tok):
    # as the official runtime does (tests/test_prompt_tokens.py checks it against llama.cpp): an input
    # starting with newlines does not merge with the prefix's last newline, as one string would
    prefix, suffix = "[INPUT]\n", "\n[END_INPUT]"
    for text in ("  two spaces", "plain", "\n\nnewlines", "trailing   ", "\n", ""):
        assert tok.encode_prompt(prefix, text, suffix) == tok.encode(prefix) + tok.encode(text + suffix)
    assert tok.encode_prompt(prefix, "\n\nnewlines", suffix) != tok.encode(prefix + "\n\nnewlines" + suffix)
