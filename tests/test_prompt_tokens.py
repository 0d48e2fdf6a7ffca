"""End to end: the prompt ids paw_lite evaluates (`PawFunction.prompt_ids`) against llama.cpp
tokenizing the filled template the way the official runtime does (programasweights 0.4.14,
runtime_llamacpp.py: `Llama.tokenize(prefix, add_bos=False, special=True)` once, then
`tokenize(input + suffix, add_bos=False, special=True)` per call), on the real GPT-2 vocabulary.

Inputs cover the template boundary (leading and trailing spaces and newlines, which BPE merges),
unicode, llama.cpp's own reference cases, and text that looks like a control token: there paw_lite
differs on purpose (typed text stays text) and the test pins that difference. Also: what llama.cpp
does with `tokenizer.ggml.add_bos_token` / `add_eos_token` and `tokenizer.ggml.pre`, and that
paw_lite matches or refuses each."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

import paw_lite
from paw_lite.errors import InvalidFileError
from paw_lite.gguf_file import read_index
from paw_lite.tokenizer import GPT2Tokenizer

from conftest import TEMPLATE, make_hf_gpt2, make_program
from oracles import oracle

llama_cpp = oracle("llama_cpp")

EOT = 50256  # <|endoftext|>, GPT-2's one control token
# Each meets the template's "[INPUT]\n" before it and "\n[END_INPUT]" after it.
BOUNDARY = ["", " ", "  ", "x", " x", "  x", "\n", "\n\n", "\nx", "\n\nx", "\n x", " \nx", "\t", "\tx", "\r\n",
            "x ", "x  ", "x\n", "x\n\n", "x \n", " x \n ", "\n\n\n\n", "   \n\n   ", "[END_INPUT]", "]\n[", "\n["]
UNICODE = ["ünïcödé ✓", "naïve café — 東京 🤖", "日本語のテキスト", "🙂👍🏽👨‍👩‍👧", "e\u0301 a\u0308", "\u200b zero\u200dwidth",
           "שלום عالم", "\u00a0nbsp\u00a0", "\u3000ideographic\u3000", "line\u2028sep", "\u0085next line", "\x00\x01\x7f",
           "Ω≈ç√∫ ½ ℕ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\ufeffbom", "ﬁ ligature", "İstanbul ǅ"]
TOKEN_LIKE = ["<|endoftext", "endoftext|>", "<|endoftext|", "<| endoftext |>", "<|im_end|>", "<prefix_1>",
              "<|END_OF_TEXT|>", "{INPUT_PLACEHOLDER}"]
CONTROL_TEXT = ["<|endoftext|>", "a<|endoftext|>b", " <|endoftext|> ", "\n<|endoftext|>\n", "<|endoftext|><|endoftext|>"]
# A template that holds the control token in its prefix and suffix: recognised there by both.
CONTROL_TEMPLATE = ("<|endoftext|>[PSEUDO_PROGRAM]\nTask: echo.\n[END_PSEUDO_PROGRAM]\n\n"
                    "[INPUT]\n{INPUT_PLACEHOLDER}\n[END_INPUT]<|endoftext|>")


def reference_inputs(vocab_dir: Path) -> list[str]:
    """llama.cpp's own tokenizer edge cases for GPT-2 (ggml-vocab-gpt-2.gguf.inp)."""
    cases = (vocab_dir / "ggml-vocab-gpt-2.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    return [c for c in cases if c]


class OfficialTokens:
    """The official runtime's prompt ids, from llama.cpp on a GGUF's own vocabulary."""

    def __init__(self, path: Path):
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)

    def ids(self, text: str, special: bool = True, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def prompt(self, template: str, text: str, special_input: bool = True) -> list[int]:
        prefix, suffix = template.split("{INPUT_PLACEHOLDER}")
        return self.ids(prefix) + self.ids(text + suffix, special=special_input)

    def close(self) -> None:
        self.llm.close()


@pytest.fixture(scope="module")
def interpreter(tmp_path_factory, hf_tokenizer_dir) -> Path:
    """A tiny random GPT-2 with the real vocabulary and the published 2048-position context, room
    for llama.cpp's longest reference case."""
    from paw_lite.convert.gpt2 import convert_hf_gpt2

    folder = tmp_path_factory.mktemp("interp2048")
    return convert_hf_gpt2(make_hf_gpt2(folder / "hf", hf_tokenizer_dir, n_ctx=2048), folder / "tiny.gguf", "f32")


@pytest.fixture(scope="module")
def official(interpreter):
    tokens = OfficialTokens(interpreter)
    yield tokens
    tokens.close()


@pytest.fixture(scope="module")
def fns(tmp_path_factory, tiny_lora, interpreter):
    """Functions on that interpreter, one per template."""
    folder = tmp_path_factory.mktemp("prompt_tokens")
    out = {}
    for name, template in (("plain", TEMPLATE), ("control", CONTROL_TEMPLATE)):
        program = make_program(folder / f"{name}.paw", tiny_lora, 16.0, "f32", template=template)
        out[template] = paw_lite.function(program, base_model=interpreter, prefix_cache_enabled=False)
    yield out
    for fn in out.values():
        fn.close()


def test_the_tiny_interpreter_holds_the_real_gpt2_vocabulary(official, vocab_dir):
    """The converter's vocabulary tokenizes like llama.cpp's own GPT-2 vocabulary file, so the ids
    below are GPT-2's real ones."""
    real = OfficialTokens(vocab_dir / "ggml-vocab-gpt-2.gguf")
    try:
        for text in reference_inputs(vocab_dir) + UNICODE + ["<|endoftext|> x"]:
            assert official.ids(text) == real.ids(text), repr(text)
    finally:
        real.close()


@pytest.mark.parametrize("template", [TEMPLATE, CONTROL_TEMPLATE], ids=["plain", "control-token-template"])
def test_prompt_ids_equal_the_official_runtimes(fns, official, vocab_dir, template):
    fn = fns[template]
    texts = BOUNDARY + UNICODE + TOKEN_LIKE + reference_inputs(vocab_dir)
    texts += [a + b for a in ("", " ", "\n", "\n\n") for b in ("word", "\n", "  ", "日本")]  # more boundary pairs
    mismatched = [t for t in texts if fn.prompt_ids(t) != official.prompt(template, t)]
    assert not mismatched, mismatched
    # the control tokens of the template are read as control tokens by both
    assert fn.prompt_ids("x").count(EOT) == template.count("<|endoftext|>")


def test_an_input_starting_with_a_newline_does_not_merge_into_the_prefix(fns, official):
    """The case that parts a whole-string tokenization from the official runtime's: the prefix
    ends with a newline, and two newlines are one GPT-2 token ("\\n\\n" = 628)."""
    fn = fns[TEMPLATE]
    prefix, suffix = TEMPLATE.split("{INPUT_PLACEHOLDER}")
    whole = official.ids(prefix + "\n\nx" + suffix)
    assert fn.prompt_ids("\n\nx") == official.prompt(TEMPLATE, "\n\nx") != whole
    assert fn.prompt_ids("\n\nx")[:len(official.ids(prefix))] == official.ids(prefix)


@pytest.mark.parametrize("text", CONTROL_TEXT)
def test_control_token_text_in_an_input_stays_text(fns, official, text):
    """The deliberate difference: the official runtime reads <|endoftext|> typed in an input as the
    control token; paw_lite reads it as text, as llama.cpp does with special=False for the input."""
    fn = fns[TEMPLATE]
    ours = fn.prompt_ids(text)
    assert ours == official.prompt(TEMPLATE, text, special_input=False)
    assert EOT not in ours and EOT in official.prompt(TEMPLATE, text)


# -- tokenizer keys of the GGUF ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab_fields(vocab_dir) -> dict[str, tuple]:
    """The metadata of llama.cpp's GPT-2 vocabulary file as (value, type, item type), read once
    (gguf-py takes seconds over 50k tokens)."""
    reader = gguf.GGUFReader(vocab_dir / "ggml-vocab-gpt-2.gguf")
    return {k: (f.contents(), f.types[0], f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
            for k, f in reader.fields.items() if not k.startswith("GGUF.") and k != "general.architecture"}


def vocab_copy(fields: dict[str, tuple], dst: Path, **changes) -> Path:
    """A tensorless vocabulary GGUF (as llama.cpp's ggml-vocab files are) with `fields`, some keys
    changed: a value of None leaves the key out."""
    types = {bool: gguf.GGUFValueType.BOOL, str: gguf.GGUFValueType.STRING}
    writer = gguf.GGUFWriter(dst, "gpt2")
    for key in sorted(set(fields) | set(changes)):
        if key not in changes:
            writer.add_key_value(key, *fields[key])
        elif changes[key] is not None:
            writer.add_key_value(key, changes[key], types[type(changes[key])])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def paw_tokenizer(path: Path) -> GPT2Tokenizer:
    """The tokenizer as BaseModel.load builds it, from the bounded header reader."""
    return GPT2Tokenizer.from_gguf(read_index(path), path)


def test_add_bos_and_eos_tokens_change_nothing_under_the_official_call(vocab_fields, tmp_path):
    """llama.cpp adds BOS/EOS only when the caller asks for special tokens; the official runtime
    does not (add_bos=False), so a file that sets both keys gets the same prompt ids, from llama.cpp
    and from paw_lite: no BOS, no EOS."""
    path = vocab_copy(vocab_fields, tmp_path / "bos.gguf",
                      **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    llama = OfficialTokens(path)
    try:
        prefix, suffix = TEMPLATE.split("{INPUT_PLACEHOLDER}")
        ours = paw_tokenizer(path).encode_prompt(prefix, " x", suffix)
        assert ours == llama.prompt(TEMPLATE, " x") and EOT not in ours
        # the keys are in effect in llama.cpp: asked for special tokens, it adds both
        asked = llama.ids("x", add_bos=True)
        assert asked[0] == EOT and asked[-1] == EOT and asked[1:-1] == llama.ids("x")
    finally:
        llama.close()


@pytest.mark.parametrize("pre, message", [(None, "tokenizer.ggml.pre is missing"), ("qwen2", "tokenizer.ggml.pre is 'qwen2'"),
                                          ("default", "tokenizer.ggml.pre is 'default'")])
def test_another_pre_tokenizer_is_refused(vocab_dir, vocab_fields, tmp_path, pre, message):
    """llama.cpp splits text by the regex `tokenizer.ggml.pre` names (a missing one is its 'default'):
    on such a file its ids differ from GPT-2's, which is all paw_lite implements, so paw_lite refuses
    the file instead of tokenizing differently."""
    path = vocab_copy(vocab_fields, tmp_path / "pre.gguf", **{"tokenizer.ggml.pre": pre})
    with pytest.raises(InvalidFileError, match=message + ".*expected 'gpt-2'.*paw-lite convert gpt2"):
        paw_tokenizer(path)
    gpt2 = OfficialTokens(vocab_dir / "ggml-vocab-gpt-2.gguf")
    other = OfficialTokens(path)
    try:
        texts = reference_inputs(vocab_dir) + UNICODE
        assert any(gpt2.ids(t) != other.ids(t) for t in texts), "this pre-tokenizer should split some text differently"
    finally:
        gpt2.close()
        other.close()


def test_an_add_bos_token_that_is_not_a_bool_is_refused(vocab_fields, tmp_path):
    path = vocab_copy(vocab_fields, tmp_path / "bad.gguf", **{"tokenizer.ggml.add_bos_token": "yes"})
    with pytest.raises(InvalidFileError, match="'tokenizer.ggml.add_bos_token' is 'yes', expected true or false"):
        paw_tokenizer(path)


def test_the_converter_writes_what_is_accepted(interpreter):
    fields = read_index(interpreter).fields
    assert fields["tokenizer.ggml.pre"].value == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"].value is False
    paw_tokenizer(interpreter)
