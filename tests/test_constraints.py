"""Constrained outputs (choices, regex, JSON schema).

Two kinds of oracle:
- the masks themselves against brute force over the real GPT-2 vocabulary: a token is allowed when
  the text with it can still become optional ASCII whitespace + a valid output (a byte-prefix test
  for choices; Python's `regex` partial matching for an ASCII regex);
- the engine's constrained greedy decoding against masked greedy decoding on transformers + PEFT
  (full logits at every step, the mask recomputed from scratch by replaying the tokens so far).
Logits differ from transformers by float noise (~1e-5 on these models, tests/test_gpt2_parity.py),
far below the winning margins, so the token ids must be identical."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from oracles import oracle

import paw_lite
from paw_lite.constraints import ConstraintError, Constraints, IncompleteOutputError, OutputConstraint
from paw_lite.errors import PawError

jsonschema = oracle("jsonschema")
regex_module = oracle("regex")  # partial matching, which Python's re lacks
oracle("transformers", "peft")

WS = b" \t\r\n"
EOS = 50256
TEXTS = ["", "ok", "disk usage at 99% on /var and climbing fast", "ünïcödé ✓", "\n\nleading newlines",
         "a <|endoftext|> b", "user logged in", "kernel panic - not syncing"]
CHOICES = [["ALERT", "QUIET"], ["ALERT", "ALERTS", "AL"], ["né", "naïve", "日本"], ["x"], ["{", "}}", "a b"]]
REGEXES = [r"[0-9]{1,3}", r"(yes|no)", r"ID-[A-Z]{2}[0-9]", r"[a-z]+( [a-z]+)?"]
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["ALERT", "QUIET", "INFO", "WARN"]},
                                           "severity": {"enum": ["low", "mid", "high"]}},
          "required": ["label", "severity"], "additionalProperties": False}
FREE_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0, "maximum": 999}},
               "required": ["name", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny_fn(tiny_program, tiny_gguf, tmp_path_factory):
    with paw_lite.function(tiny_program, base_model=tiny_gguf, cache_dir=tmp_path_factory.mktemp("c")) as f:
        yield f


@pytest.fixture(scope="module")
def constraints(tiny_fn) -> Constraints:
    return Constraints(tiny_fn.tokenizer)


@pytest.fixture(scope="module")
def token_bytes(tiny_fn) -> list[bytes]:
    return [tiny_fn.tokenizer.token_bytes(i) for i in range(tiny_fn.tokenizer.n_vocab)]


def brute_choice_mask(text: bytes, choices: list[str], token_bytes: list[bytes]) -> set[int]:
    targets = [c.encode() for c in choices]

    def can_become_valid(t: bytes) -> bool:
        rest = t.lstrip(WS)
        return any(c.startswith(rest) for c in targets)

    allowed = {i for i, b in enumerate(token_bytes) if b and i != EOS and can_become_valid(text + b)}
    if text.lstrip(WS) in targets:
        allowed.add(EOS)
    return allowed


def brute_regex_mask(text: bytes, pattern: str, token_bytes: list[bytes]) -> set[int]:
    """For an ASCII pattern: a token whose text holds a non-ASCII byte can never be in a match."""
    full = regex_module.compile(rf"[ \t\r\n]*(?:{pattern})")
    allowed = set()
    for i, b in enumerate(token_bytes):
        t = text + b
        if b and i != EOS and t.isascii() and full.fullmatch(t.decode("ascii"), partial=True):
            allowed.add(i)
    if full.fullmatch(text.decode("ascii")):
        allowed.add(EOS)
    return allowed


@pytest.mark.parametrize("choices", CHOICES)
def test_choice_masks_equal_brute_force_along_random_paths(constraints, token_bytes, choices):
    matcher = constraints.compile(OutputConstraint.of(choices=choices))
    rng = np.random.default_rng(0)
    for _ in range(6):
        state = matcher.start()
        for _ in range(12):
            if state.finished:
                break
            allowed = state.allowed()
            assert set(allowed.tolist()) == brute_choice_mask(state.text(), choices, token_bytes), state.text()
            state.advance(int(rng.choice(allowed)))


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_masks_equal_brute_force_where_nothing_is_forced(constraints, token_bytes, pattern):
    matcher = constraints.compile(OutputConstraint.of(regex=pattern))
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(4):
        state = matcher.start()
        for _ in range(8):
            if state.finished:
                break
            allowed = state.allowed()
            if len(allowed) > 1:  # a forced step's mask is its one canonical token (module docstring)
                assert set(allowed.tolist()) == brute_regex_mask(state.text(), pattern, token_bytes), state.text()
                checked += 1
            state.advance(int(rng.choice(allowed)))
    assert checked >= 4


def masked_greedy(hf, prompt: list[int], new_state, limit: int) -> list[int] | tuple[str, list[int]]:
    """Greedy decoding over transformers' full logits, restricted at every step to the mask of a
    state rebuilt from scratch from the tokens so far; stops at EOS, at `limit`, or where the
    output is complete and cannot go on. ("cut", ids) when `limit` came first."""
    torch = oracle("torch")
    out: list[int] = []
    while len(out) < limit:
        state = new_state()
        for t in out:
            state.advance(t)
        if state.finished:
            break
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float().numpy()
        allowed = state.allowed()
        token = int(allowed[np.argmax(logits[allowed])])
        if token == EOS:
            return out
        out.append(token)
    state = new_state()
    for t in out:
        state.advance(t)
    return out if state.complete else ("cut", out)


def ids_or_cut(fn, text: str, limit: int, **constraint) -> list[int] | tuple[str, list[int]]:
    try:
        return fn.generate_ids(text, max_tokens=limit, **constraint)
    except IncompleteOutputError as err:
        assert err.partial == fn.tokenizer.decode(err.ids)
        return "cut", err.ids


@pytest.fixture(scope="module")
def hf_oracle(tiny_hf, tiny_gguf, tiny_lora, tmp_path_factory):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from paw_lite.base_model import BaseModel
    from paw_lite.lora import LoraAdapter, write_adapter_gguf, write_peft_dir

    d = tmp_path_factory.mktemp("peft")
    write_adapter_gguf(d / "adapter.gguf", tiny_lora, 16.0, "f32")
    write_peft_dir(d / "peft", LoraAdapter.from_gguf(d / "adapter.gguf", BaseModel.load(tiny_gguf).config))
    return PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_hf), d / "peft").eval()


def _kwargs(kind: str, value):
    return {kind: value}


CASES = [("choices", c) for c in CHOICES] + [("regex", r) for r in REGEXES] + [("json_schema", SCHEMA)]


@pytest.mark.parametrize("kind,value", CASES)
def test_constrained_calls_equal_masked_greedy_on_transformers(tiny_fn, constraints, hf_oracle, kind, value):
    matcher = constraints.compile(OutputConstraint.of(**_kwargs(kind, value)))
    for text in TEXTS[:5]:
        expected = masked_greedy(hf_oracle, tiny_fn.prompt_ids(text), matcher.start, 24)
        assert ids_or_cut(tiny_fn, text, 24, **_kwargs(kind, value)) == expected, text


def test_the_unconstrained_outputs_are_not_valid_so_the_constraint_did_the_work(tiny_fn):
    free = [tiny_fn(t, max_tokens=8) for t in TEXTS]
    assert not any(out in ("ALERT", "QUIET") for out in free)
    assert [tiny_fn(t, max_tokens=8, choices=["ALERT", "QUIET"]) for t in TEXTS] == \
        [o for o in tiny_fn.map(TEXTS, max_tokens=8, choices=["ALERT", "QUIET"])]


@pytest.mark.parametrize("kind,value", CASES)
def test_map_equals_calls_one_by_one(tiny_fn, kind, value):
    texts = TEXTS * 2
    kwargs = _kwargs(kind, value)
    mapped = tiny_fn.map_ids(texts, max_tokens=24, batch_size=3, errors="return", **kwargs)
    assert [("cut", r.ids) if isinstance(r, IncompleteOutputError) else r for r in mapped] == \
        [ids_or_cut(tiny_fn, t, 24, **kwargs) for t in texts]


def test_outputs_are_valid(tiny_fn):
    """Every output that is not cut short is valid; a random model may spend all its tokens on
    leading whitespace, so a few inputs may be cut, but most must finish for this to mean anything."""
    many = [f"event {i}: {w}" for i, w in enumerate(["disk full", "login", "panic", "ok", "retry"] * 8)]
    kinds = [({"choices": c}, lambda out, c=c: out in c) for c in CHOICES]
    kinds += [({"regex": r}, lambda out, r=r: re.fullmatch(r, out)) for r in REGEXES]
    for schema in (SCHEMA, FREE_SCHEMA, json.dumps(SCHEMA)):
        parsed = json.loads(schema) if isinstance(schema, str) else schema
        kinds.append(({"json_schema": schema}, lambda out, s=parsed: jsonschema.validate(json.loads(out), s) is None))
    for kwargs, valid in kinds:
        outs = tiny_fn.map(TEXTS + many, max_tokens=40, errors="return", **kwargs)
        done = [out for out in outs if not isinstance(out, IncompleteOutputError)]
        assert len(done) >= 0.5 * len(outs), kwargs
        for out in done:
            assert isinstance(out, str) and valid(out), (kwargs, out)


def test_forced_tokens_and_complete_outputs_cost_no_steps(tiny_fn, monkeypatch):
    """One step per token the model chose: none after an output that is complete and cannot go on
    ("x" is the only choice), none for the tokens a schema forces (keys and punctuation)."""
    from paw_lite.gpt2_packed import GPT2Packed

    steps = []
    real = GPT2Packed.forward
    monkeypatch.setattr(GPT2Packed, "forward", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
    ids = tiny_fn.generate_ids("ok", max_tokens=24, choices=["x"])
    assert tiny_fn.tokenizer.decode(ids).strip() == "x" and len(steps) == len(ids)
    steps.clear()
    ids = tiny_fn.generate_ids("user logged in", max_tokens=40, json_schema=SCHEMA)
    out = json.loads(tiny_fn.tokenizer.decode(ids))
    assert set(out) == {"label", "severity"}
    assert len(steps) <= len(ids) - 4, (len(steps), len(ids))  # at least '"label":"' and '","severity":"' forced


def test_a_cut_output_is_an_error_naming_the_input_and_the_partial_text(tiny_fn):
    with pytest.raises(IncompleteOutputError, match="partial output") as err:
        tiny_fn("user logged in", max_tokens=2, json_schema=SCHEMA)
    assert len(err.value.ids) == 2 and repr(err.value.partial) in str(err.value)
    assert err.value.partial == tiny_fn.tokenizer.decode(err.value.ids)
    results = tiny_fn.map(["a", "b"], max_tokens=2, json_schema=SCHEMA, errors="return")
    assert all(isinstance(r, IncompleteOutputError) for r in results)
    # Each input its own outcome: the cut ones their error, every other one its output.
    lengths = [len(ids) for ids in tiny_fn.map_ids(TEXTS, max_tokens=24, choices=["ALERT", "QUIET"])]
    assert min(lengths) < max(lengths)  # so the shortest output's length cuts some and not others
    kwargs = {"max_tokens": min(lengths), "choices": ["ALERT", "QUIET"]}
    mixed = tiny_fn.map(TEXTS, errors="return", **kwargs)
    assert any(isinstance(r, IncompleteOutputError) for r in mixed) and any(isinstance(r, str) for r in mixed)
    for text, r in zip(TEXTS, mixed):
        if isinstance(r, IncompleteOutputError):
            with pytest.raises(IncompleteOutputError) as one:
                tiny_fn(text, **kwargs)
            assert one.value.ids == r.ids
        else:
            assert r == tiny_fn(text, **kwargs)
    with pytest.raises(IncompleteOutputError, match="input 0 of the map"):  # the first cut input
        tiny_fn.map(["user logged in", "ok"], max_tokens=2, json_schema=SCHEMA)


@pytest.mark.parametrize("kwargs,message", [
    ({"choices": []}, "choices is empty"),
    ({"choices": ["a", ""]}, "empty choice"),
    ({"choices": [" a"]}, "starts with whitespace"),
    ({"regex": "(unclosed"}, "regex '\\(unclosed' cannot be compiled"),
    ({"json_schema": {"type": "integer", "minimum": "x"}}, "json_schema cannot be compiled"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"json_schema": [1]}, "must be a JSON object"),
    ({"choices": ["a"], "regex": "a"}, "at most one constraint"),
])
def test_bad_constraints_are_refused_before_any_evaluation(tiny_fn, monkeypatch, kwargs, message):
    from paw_lite.gpt2_packed import GPT2Packed

    monkeypatch.setattr(GPT2Packed, "forward", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(ConstraintError, match=message):
        tiny_fn("x", **kwargs)
    with pytest.raises(ConstraintError, match=message):
        tiny_fn.map(["x", "y"], **kwargs)


def test_a_choice_no_token_sequence_can_spell_is_refused():
    from paw_lite.constraints import ChoiceMatcher, TokenTable

    table = TokenTable([b"a", b"b", b"ab", b""], eos=3, special={3: "<|endoftext|>"})
    ChoiceMatcher(("ab", "ba"), table)
    with pytest.raises(ConstraintError, match="'ac' cannot be spelled"):
        ChoiceMatcher(("ab", "ac"), table)


def test_types_are_checked(tiny_fn):
    with pytest.raises(TypeError, match="choices must be a list"):
        tiny_fn("x", choices="ALERT")
    with pytest.raises(TypeError, match="choices must be str"):
        tiny_fn("x", choices=["a", 1])
    with pytest.raises(TypeError, match="regex must be a str"):
        tiny_fn("x", regex=5)
    assert issubclass(ConstraintError, PawError)
