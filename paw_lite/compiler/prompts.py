"""The published prompt texts (shipped byte for byte in `paw_lite/prompts/`) and chat-template
rendering as transformers' `apply_chat_template` does it (the paper, arXiv 2607.02512, and the public reimplementation avra-m3/program-as-weights-server)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from importlib import resources

from ..errors import IncompatibleModelError, InvalidFileError, require
from ..program import PLACEHOLDER

COMPILER_EXAMPLES = "compiler_examples.txt"
COMPILER_MINIMAL = "compiler_minimal.txt"
INTERPRETER_MINIMAL = "interpreter_minimal.txt"

_FIELD = re.compile(r"\{(\w+)\}")


@lru_cache(maxsize=None)
def prompt_text(name: str) -> str:
    """One of the prompt files, exactly as shipped."""
    return resources.files("paw_lite.prompts").joinpath(name).read_text(encoding="utf-8")


def fill(template: str, **values: str) -> str:
    """`template.format(**values)` for templates whose only braces are `{field}` markers: one pass, so
    text inside a value (a spec holding `{task_input}`) is never substituted again."""
    missing = set(_FIELD.findall(template)) - set(values)
    if missing:
        raise KeyError(f"no value for {sorted(missing)}")
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def examples_prompt(spec: str) -> str:
    """The pseudo compiler's user message (§2.1)."""
    return fill(prompt_text(COMPILER_EXAMPLES), spec=spec).strip()


def minimal_prompt(spec: str) -> str:
    """The trained compiler's user message (§2.2)."""
    return fill(prompt_text(COMPILER_MINIMAL), spec=spec).strip()


def interpreter_template(pseudo_program: str) -> str:
    """The program's prompt template (§3): the pseudo-program with the input placeholder, stripped."""
    if PLACEHOLDER in pseudo_program:
        raise IncompatibleModelError(f"the pseudo-program contains {PLACEHOLDER}, which would break the program's template; remove it")
    return fill(prompt_text(INTERPRETER_MINIMAL), pseudo_program=pseudo_program.strip(), task_input=PLACEHOLDER).strip()


# -- chat templates ---------------------------------------------------------------------------------


def render_chat(template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool,
                special_tokens: dict[str, str] | None = None, source: str = "chat template") -> str:
    """Render a chat template the way transformers' `apply_chat_template(tokenize=False)` does: a
    sandboxed jinja2 environment with trim_blocks and lstrip_blocks, loop controls, a JSON `tojson`
    that does not escape HTML, `raise_exception`, `strftime_now`, and the tokenizer's special tokens
    (`bos_token`, `eos_token`, ...) as variables."""
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **(special_tokens or {}))
    except Exception as exc:  # noqa: BLE001 - template code is the model's: any error it raises is the template's
        raise IncompatibleModelError(f"{source}: rendering failed: {type(exc).__name__}: {exc}") from exc


@lru_cache(maxsize=8)
def _compile(template: str):
    jinja2 = require("jinja2", "compile")
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """`{% generation %}…{% endgeneration %}` marks assistant text for training masks; rendering
        keeps its body unchanged (as transformers does when no mask is asked for)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidFileError(f"chat template does not parse: {exc}") from exc
