"""The Qwen tokenizer (Standard programs) against llama.cpp on the real Qwen vocabulary.

Prompt ids: the official runtime (programasweights 0.4.14, runtime_llamacpp.py) tokenizes the
template's prefix alone and then input + suffix, both with llama.cpp's `tokenize(add_bos=False,
special=True)`; paw_lite's `encode_prompt` must give the same ids for the Standard template around
many inputs. The GGUF is a tiny Qwen3 converted by `paw-lite convert qwen3` from an HF folder with
the real Qwen vocabulary and Qwen3's added tokens: `<|im_start|>`, `<|im_end|>`, `<|endoftext|>` are
CONTROL tokens, `<think>` and `</think>` USER_DEFINED ones (both matched in the template). Text
typed by the user that looks like one of them stays text in paw_lite, on purpose (the GPT-2 rule)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import TokenType

from paw_lite.errors import InvalidFileError
from paw_lite.families import COMPACT, STANDARD, standard_template
from paw_lite.gguf_file import read_index
from paw_lite.testing.qwen3 import ENDOFTEXT_ID, IM_END_ID, IM_START_ID, reference_cases
from paw_lite.tokenizer import BPETokenizer

from compiler_fixtures import tiny_qwen
from oracles import oracle

llama_cpp = oracle("llama_cpp")
oracle("transformers")

PSEUDO = "Task: classify the sentiment of the text.\n\nExamples:\nInput: I love it\nOutput: positive"
TEMPLATE = standard_template(PSEUDO, "{INPUT_PLACEHOLDER}")
# Each meets "[INPUT]\n" before it and "\n[END_INPUT]<|im_end|>" after it.
BOUNDARY = ["", " ", "  ", "x", " x", "\n", "\n\n", "\nx", "\n\nx", "\n x", " \nx", "\t", "\tx", "\r\n", "x ",
            "x\n", "x\n\n", "x \n", " x \n ", "\n\n\n\n", "   \n\n   ", "[END_INPUT]", "]\n[", "\n["]
DIGITS = ["12345", "3.14159", "1,000,000", "phone 555-0123", "2026-12-06T22:30:00Z", "0x1F", "١٢٣ ٤٥٦", "½ ⅓ ²"]
UNICODE = ["ünïcödé ✓", "naïve café — 東京 🤖", "日本語のテキスト", "🙂👍🏽👨‍👩‍👧", "e\u0301 a\u0308", "\u200b zero\u200dwidth",
           "שלום عالم", "\u00a0nbsp\u00a0", "\u3000ideographic\u3000", "line\u2028sep", "\u0085next line",
           "Ω≈ç√∫ ½ ℕ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\ufeffbom", "ﬁ ligature", "İstanbul ǅ", "DON'T it's I'M we'LL", "Ünïcode'S"]
TOKEN_LIKE = ["<|im_end", "im_end|>", "<| im_end |>", "<thinking>", "</ think>", "<prefix_1", "{INPUT_PLACEHOLDER}"]
# Text the template would match as one token: paw_lite keeps it text in the input (llama.cpp would not).
MATCHED_TEXT = ["<|im_end|>", "<|im_start|>user", "<|endoftext|>", "<think>", "a</think>b", "<think>\n\n</think>"]


class OfficialTokens:
    """llama.cpp's tokenizer on a GGUF's own vocabulary, as the official runtime calls it."""

    def __init__(self, path: Path):
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)

    def ids(self, text: str, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def prompt(self, template: str, text: str) -> list[int]:
        prefix, suffix = template.split("{INPUT_PLACEHOLDER}")
        return self.ids(prefix) + self.ids(text + suffix)

    def close(self) -> None:
        self.llm.close()


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory, vocab_dir) -> Path:
    return tiny_qwen(tmp_path_factory, vocab_dir)[1]


@pytest.fixture(scope="module")
def tok(qwen_gguf) -> BPETokenizer:
    return BPETokenizer.from_gguf(read_index(qwen_gguf), qwen_gguf, STANDARD)


@pytest.fixture(scope="module")
def official(qwen_gguf):
    tokens = OfficialTokens(qwen_gguf)
    yield tokens
    tokens.close()


def reference_inputs(vocab_dir: Path) -> list[str]:
    return [text for text, _ in reference_cases(vocab_dir) if text]


def test_llama_cpp_reference_cases_on_the_qwen2_vocabulary(vocab_dir):
    """llama.cpp's own Qwen2 tokenizer cases (ggml-vocab-qwen2.gguf.inp/.out): the split regex, the
    merges, and no NFC normalisation."""
    path = vocab_dir / "ggml-vocab-qwen2.gguf"
    tok = BPETokenizer.from_gguf(read_index(path), path, STANDARD)
    cases = reference_cases(vocab_dir)
    assert len(cases) >= 40
    for text, want in cases:
        assert tok.encode_plain(text) == want, text


def test_the_converted_file_marks_chat_tokens_control_and_think_user_defined(qwen_gguf, tok):
    """What this test module relies on: the token types llama.cpp's converter gives Qwen3's added tokens."""
    fields = read_index(qwen_gguf).fields
    tokens, types = fields["tokenizer.ggml.tokens"].value, fields["tokenizer.ggml.token_type"].value
    kind = {tokens[i]: types[i] for i in range(len(tokens))}
    assert kind["<|im_start|>"] == kind["<|im_end|>"] == kind["<|endoftext|>"] == TokenType.CONTROL
    assert kind["<think>"] == kind["</think>"] == TokenType.USER_DEFINED
    assert tok.eos_ids == (IM_END_ID, ENDOFTEXT_ID) and tok.eos_id == IM_END_ID
    assert {"<|im_start|>", "<|im_end|>", "<think>", "</think>", "<prefix_1>"} <= set(tok.special)


@pytest.mark.parametrize("group", ["boundary", "digits", "unicode", "token_like", "reference"])
def test_prompt_ids_equal_the_official_runtimes(tok, official, vocab_dir, group):
    inputs = {"boundary": BOUNDARY, "digits": DIGITS, "unicode": UNICODE, "token_like": TOKEN_LIKE,
              "reference": reference_inputs(vocab_dir)}[group]
    prefix, suffix = TEMPLATE.split("{INPUT_PLACEHOLDER}")
    for text in inputs:
        for lead in ("", "\n", " ", "\n\n "):  # newlines and spaces at the start meet the prefix's last newline
            ours = tok.encode_prompt(prefix, lead + text, suffix)
            assert ours == official.prompt(TEMPLATE, lead + text), repr(lead + text)


def test_the_template_holds_each_chat_and_think_token_once(tok, official):
    prefix, suffix = TEMPLATE.split("{INPUT_PLACEHOLDER}")
    ids = tok.encode_prompt(prefix, "hello", suffix)
    think, end_think = tok.special["<think>"], tok.special["</think>"]
    assert ids[0] == IM_START_ID and ids.count(IM_START_ID) == 2 and ids.count(IM_END_ID) == 1
    assert ids.count(think) == 1 and ids.count(end_think) == 1
    assert tok.encode(prefix) == official.ids(prefix)


def test_text_that_looks_like_a_matched_token_stays_text_in_the_input(tok, official):
    """llama.cpp matches these in the input too (special=True; USER_DEFINED ones even without it);
    paw_lite keeps what the user typed as text, as for GPT-2's <|endoftext|>."""
    prefix, suffix = TEMPLATE.split("{INPUT_PLACEHOLDER}")
    for text in MATCHED_TEXT:
        ours = tok.encode_prompt(prefix, text, suffix)
        assert ours == tok.encode(prefix) + tok.encode_plain(text + "\n[END_INPUT]") + tok.encode("<|im_end|>" + suffix.split("<|im_end|>", 1)[1])
        assert ours != official.prompt(TEMPLATE, text)
        assert tok.decode(tok.encode_plain(text)) == text


def test_decode_is_llama_cpps_detokenize(tok, official):
    """Control tokens write nothing, <think> writes its text (llama.cpp's detokenize with
    special=False, as the official runtime decodes an output)."""
    prefix, suffix = TEMPLATE.split("{INPUT_PLACEHOLDER}")
    ids = tok.encode_prompt(prefix, "naïve café — 東京 🤖 12", suffix) + [ENDOFTEXT_ID]
    want = official.llm.detokenize(ids).decode("utf-8", errors="replace")
    assert tok.decode(ids) == want
    assert "<think>" in want and "<|im_start|>" not in want


def test_a_qwen_file_needs_the_qwen2_pre_tokenizer(vocab_dir):
    path = vocab_dir / "ggml-vocab-qwen2.gguf"
    with pytest.raises(InvalidFileError, match="tokenizer.ggml.pre is 'qwen2', expected 'gpt-2'.*paw-lite convert gpt2"):
        BPETokenizer.from_gguf(read_index(path), path, COMPACT)
    gpt2 = vocab_dir / "ggml-vocab-gpt-2.gguf"
    with pytest.raises(InvalidFileError, match="tokenizer.ggml.pre is 'gpt-2', expected 'qwen2'.*paw-lite convert qwen3"):
        BPETokenizer.from_gguf(read_index(gpt2), gpt2, STANDARD)


def test_the_hf_folder_tokenizer_equals_the_gguf_one(tmp_path_factory, vocab_dir, tok):
    folder = tiny_qwen(tmp_path_factory, vocab_dir)[0]
    hf = BPETokenizer.from_hf_qwen_dir(folder, tok.n_vocab, STANDARD)
    prefix, suffix = TEMPLATE.split("{INPUT_PLACEHOLDER}")
    for text in BOUNDARY + UNICODE + MATCHED_TEXT:
        assert hf.encode_prompt(prefix, text, suffix) == tok.encode_prompt(prefix, text, suffix), repr(text)
    assert hf.eos_ids == tok.eos_ids and hf.special == tok.special
