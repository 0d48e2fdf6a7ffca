"""Prompt texts (shipped byte for byte) and chat-template rendering against transformers'
own renderer, over every chat template llama.cpp ships in its source tree."""

from __future__ import annotations

import hashlib
import tarfile

import pytest

from paw_lite.testing.vocab import llama_sdist
from paw_lite.compiler.prompts import (examples_prompt, fill, interpreter_template, minimal_prompt, prompt_text,
                                       render_chat)
from paw_lite.errors import IncompatibleModelError, InvalidFileError

from oracles import oracle

# sha256 of the prompt files as published (paper, Appendix C): they are interface data.
PROMPT_SHA256 = {
    "compiler_examples.txt": "ed0a459a669508ec93d34d2449b54dc51c55eeb70fb1dbec0a8073547260d9a9",
    "compiler_minimal.txt": "ce83dd1c32446857e95b55a0d1885694833f50fe034de0c5d2e53655fbb99b74",
    "interpreter_minimal.txt": "f9819d1891681803572931e1a4f2e5e35457c487f06034b363875d0decf37a65",
}
SPECS = [
    "Classify a log line as ALERT or QUIET.",
    "  Return the {task_input} field of a JSON object {\"a\": 1}; keep {spec} as is.\n\n",
    "Traduire en français : « bonjour » → 你好 🙂",
]


@pytest.mark.parametrize("name", sorted(PROMPT_SHA256))
def test_prompt_files_are_the_published_bytes(name):
    data = prompt_text(name).encode("utf-8")
    assert hashlib.sha256(data).hexdigest() == PROMPT_SHA256[name]


@pytest.mark.parametrize("spec", SPECS)
def test_fill_matches_str_format_and_never_substitutes_twice(spec):
    for name in ("compiler_examples.txt", "compiler_minimal.txt"):
        assert fill(prompt_text(name), spec=spec) == prompt_text(name).format(spec=spec)
    assert minimal_prompt(spec) == f"[SPEC]\n{spec}\n[END_SPEC]\n\n[PSEUDO_PROGRAM]".strip()
    assert examples_prompt(spec).endswith(f"[SPEC]\n{spec}\n[END_SPEC]".strip())


def test_interpreter_template():
    pseudo = "\n[PSEUDO_PROGRAM]\nTask: echo {task_input}.\n[END_PSEUDO_PROGRAM]\n\n"
    assert interpreter_template(pseudo) == pseudo.strip() + "\n\n[INPUT]\n{INPUT_PLACEHOLDER}\n[END_INPUT]"
    with pytest.raises(IncompatibleModelError, match="INPUT_PLACEHOLDER"):
        interpreter_template("Task: {INPUT_PLACEHOLDER}")


def _sdist_templates() -> dict[str, str]:
    out = {}
    with tarfile.open(llama_sdist()) as tf:
        for member in tf.getmembers():
            if "/vendor/llama.cpp/models/templates/" in member.name and member.name.endswith(".jinja"):
                out[member.name.rsplit("/", 1)[-1]] = tf.extractfile(member).read().decode("utf-8")
    assert len(out) > 40
    return out


SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def test_rendering_matches_transformers_on_llama_cpp_templates():
    render_jinja_template = oracle("transformers.utils.chat_template_utils").render_jinja_template

    from paw_lite.testing.qwen3 import CHAT_TEMPLATE

    templates = {"tiny-qwen": CHAT_TEMPLATE, **_sdist_templates()}
    conversations = [
        [{"role": "user", "content": examples_prompt(SPECS[1])}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": minimal_prompt(SPECS[2])}],
    ]
    compared = 0
    for name, template in sorted(templates.items()):
        for messages in conversations:
            for gen in (True, False):
                try:
                    want = render_jinja_template([messages], chat_template=template, add_generation_prompt=gen, **SPECIAL)[0][0]
                except Exception:  # transformers refuses: so must we
                    with pytest.raises((IncompatibleModelError, InvalidFileError)):
                        render_chat(template, messages, add_generation_prompt=gen, special_tokens=SPECIAL)
                    continue
                assert render_chat(template, messages, add_generation_prompt=gen, special_tokens=SPECIAL) == want, name
                compared += 1
    assert compared > 150
    # the published shape for Qwen models
    qwen = render_chat(templates["Qwen-Qwen3-0.6B.jinja"], conversations[0][:1], add_generation_prompt=True)
    assert qwen == f"<|im_start|>user\n{examples_prompt(SPECS[1])}<|im_end|>\n<|im_start|>assistant\n"


def test_template_errors_are_clear():
    with pytest.raises(IncompatibleModelError, match="rendering failed: TemplateError: only user turns"):
        render_chat("{{ raise_exception('only user turns') }}", [{"role": "user", "content": "x"}], add_generation_prompt=True)
    with pytest.raises(InvalidFileError, match="does not parse"):
        render_chat("{% for %}", [], add_generation_prompt=True)
    # The sandbox refuses to reach Python internals, as in transformers.
    with pytest.raises(IncompatibleModelError):
        render_chat("{{ cycler.__init__.__globals__ }}", [], add_generation_prompt=True)
