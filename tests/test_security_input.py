"""Untrusted text at run time: empty and whitespace-only input, control characters, special-token
strings typed as text, invalid Unicode, inputs at and past the context end. Each either runs and
gives exactly what transformers + PEFT give on the same prompt, or fails with a clear error:
never a crash, never a truncated prompt."""

from __future__ import annotations

import pytest

import paw_lite
from paw_lite.errors import ContextOverflowError, PawError
from paw_lite.lora import LoraAdapter, write_peft_dir
from paw_lite.program import PLACEHOLDER, Program

from oracles import oracle

torch = oracle("torch")
oracle("transformers", "peft")

MAX_NEW = 8  # parity on the first 8 output tokens (or up to EOS / the context end)

ODD_INPUTS = [
    " ", "   ", "\n", "\t\t", "\n\n\n", " \n \n",  # whitespace only
    "\x00", "a\x00b", "\x1b[31mred\x1b[0m", "\x7f\x08\x0c\x0b", "\r\n", "\u2028\u2029", "\ufeffbom", "zero\u200bwidth",
    "<|endoftext|>", "a <|endoftext|> b", "<|endoftext|><|endoftext|>", "<|im_start|>user\nhi<|im_end|>",
    "[INPUT]", "[END_INPUT]", PLACEHOLDER, f"x {PLACEHOLDER} y",  # the template's own markers, typed
    "\U0001F600\U0001F4A9", "\u0301\u0301\u0301", "\uffff\ufffe",
]


@pytest.fixture(scope="module")
def fn(tiny_program, tiny_gguf, tmp_path_factory):
    f = paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path_factory.mktemp("cache"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def oracle(fn, tiny_hf, tiny_program, tmp_path_factory):
    """transformers + PEFT with the same adapter, and the HF GPT-2 tokenizer of the same vocabulary."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    tmp = tmp_path_factory.mktemp("peft")
    adapter = LoraAdapter.from_program(Program.load(tiny_program), fn.config)
    write_peft_dir(tmp / "peft", adapter)
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_hf), tmp / "peft").eval()
    return model, GPT2TokenizerFast.from_pretrained(tiny_hf)


def hf_prompt_ids(tokenizer, program: Program, text: str) -> list[int]:
    """The prompt tokenized as the official runtime splits it (the prefix, then input + suffix), with
    special-token text in the input kept as text (the template used here holds no control tokens,
    so input + suffix may be split that way)."""
    return (tokenizer(program.prefix)["input_ids"]
            + tokenizer(text + program.suffix, split_special_tokens=True)["input_ids"])


def hf_greedy(model, prompt_ids: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=50256, pad_token_id=50256)
    ids = out[0, len(prompt_ids):].tolist()
    return ids[:ids.index(50256)] if 50256 in ids else ids


def test_odd_inputs_run_and_equal_the_oracle(fn, oracle):
    model, tokenizer = oracle
    want_text = []
    for text in ODD_INPUTS:
        ids = fn.prompt_ids(text)
        assert ids == hf_prompt_ids(tokenizer, fn.program, text), repr(text)
        assert 50256 not in ids, repr(text)  # typed <|endoftext|> is text, not the control token
        want = hf_greedy(model, ids, min(MAX_NEW, fn.config.n_ctx - len(ids)))
        assert fn.generate_ids(text, max_tokens=MAX_NEW) == want, repr(text)
        want_text.append(fn.tokenizer.decode(want).strip())
    outs = fn.map(ODD_INPUTS, max_tokens=MAX_NEW)  # the batched path agrees
    assert outs == want_text
    for out in outs:
        out.encode("utf-8")  # decoded with replacement: always valid text


@pytest.mark.parametrize("text", ["\ud800", "bad \udfff text", "a\udc80", "\ud83d"])
def test_invalid_unicode_is_a_clear_error(fn, text):
    with pytest.raises(PawError, match=r"input is not valid Unicode: surrogates not allowed at position \d+"):
        fn(text)
    with pytest.raises(PawError, match="not valid Unicode"):
        fn.map(["fine", text])


def test_the_context_boundary_is_exact_and_never_truncates(fn):
    """The longest input that fits runs (the prompt holds every input token and one output token
    fits); one token more is a ContextOverflowError naming the counts."""
    n_ctx = fn.config.n_ctx
    n_fixed = len(fn.prompt_ids(""))
    a = fn.tokenizer.encode_plain(" a")
    assert len(a) == 1 and len(fn.tokenizer.encode_plain(" a" * 5)) == 5  # one token per " a"
    fits, over = " a" * (n_ctx - 1 - n_fixed), " a" * (n_ctx - n_fixed)
    ids = fn.prompt_ids(fits)
    assert len(ids) == n_ctx - 1
    assert ids.count(a[0]) >= n_ctx - 1 - n_fixed  # all of the input is there
    assert len(fn.generate_ids(fits)) <= 1
    with pytest.raises(ContextOverflowError, match=rf"prompt is {n_ctx} tokens \(template \d+ \+ input \d+\); the interpreter's context holds {n_ctx}"):
        fn(over)


def test_a_very_long_input_is_an_error_not_a_truncation(fn):
    with pytest.raises(ContextOverflowError, match=r"prompt is \d+ tokens \(template \d+ \+ input \d+\)"):
        fn("word " * 1_000)  # tokenized and counted
    with pytest.raises(ContextOverflowError, match=r"input is 500000 bytes, at least \d+ tokens"):
        fn("word " * 100_000)  # refused from its byte length


def test_a_huge_input_is_refused_without_tokenizing_it(fn, monkeypatch):
    def never(*args):
        raise AssertionError("a 1 MB input must be refused before it is tokenized")

    monkeypatch.setattr(fn.tokenizer, "encode_prompt", never)
    with pytest.raises(ContextOverflowError, match=r"input is 1000000 bytes, at least \d+ tokens"):
        fn("word " * 200_000)


def test_a_template_longer_than_the_context_is_refused(tmp_path, tiny_gguf, tiny_program):
    prog = Program.load(tiny_program)
    long = Program(meta=prog.meta, template="word " * 200 + PLACEHOLDER, adapter_gguf=prog.adapter_gguf)
    with pytest.raises(ContextOverflowError, match=r"long\.paw: the template alone is \d+ tokens; the interpreter's context holds 128"):
        paw_lite.function(long.save(tmp_path / "long.paw"), base_model=tiny_gguf, cache_dir=tmp_path)


def test_non_text_input_is_a_type_error(fn):
    for value in (b"bytes", None, 42, ["list"]):
        with pytest.raises(TypeError, match="input must be str"):
            fn(value)  # type: ignore[arg-type]
