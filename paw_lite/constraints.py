"""Constrained outputs: a call restricted to a list of choices, a regular expression or a JSON schema.

At every step the engine picks the greedy token among those after which the output can still
become valid, and EOS only where it is complete. A valid output is optional leading ASCII
whitespace (free-form outputs start with a space or newline, and are stripped) followed by exactly
one choice, a full match of the regex, or one JSON value valid under the schema. Matching is on
bytes: a token may end inside a UTF-8 character.

A constraint's per-sequence state says three things to the engine (`ConstraintState`):
- `allowed()`: the token ids the next pick is restricted to (EOS included where complete);
- `take_forced(n)`: the tokens that are the only way on from here, consumed at once so the engine
  evaluates them as one multi-row step instead of one step each;
- `finished`: the output is complete and cannot be extended, so nothing more is evaluated.

Choices use a byte match over the vocabulary's token strings (no dependency). Regexes and JSON
schemas use llguidance (the `constrain` extra), which computes token masks from the tokenizer;
its fast-forward tokens (JSON punctuation and keys the schema fixes) are taken as forced, so the
mask at such a step holds that one token."""

from __future__ import annotations

import json
import threading
from collections.abc import Collection
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import PawError, require

WHITESPACE = b" \t\r\n"  # the leading whitespace a constrained output may start with
# llguidance's marker for a control token's bytes (its llama.cpp and HF tokenizer adapters use it).
_LLG_SPECIAL = b"\xff"
MAX_CHOICES = 4096
MAX_PATTERN_CHARS = 64 * 1024  # a regex or a schema's JSON text


class ConstraintError(PawError, ValueError):
    """A constraint that cannot be used: refused before anything is evaluated."""


class IncompleteOutputError(PawError):
    """max_tokens (or the context end) cut a constrained output before it was complete."""

    def __init__(self, message: str, partial: str, ids: list[int]):
        super().__init__(message)
        self.partial = partial  # the output text so far
        self.ids = ids  # its token ids


@dataclass(frozen=True)
class OutputConstraint:
    """What a caller asked for: `kind` is "choices", "regex" or "json_schema"; `choices` the
    choices, `pattern` the regex or the schema as canonical JSON text."""

    kind: str
    choices: tuple[str, ...] = ()
    pattern: str = ""

    @classmethod
    def of(cls, choices: SequenceOf[str] | None = None, regex: str | None = None,
           json_schema: dict[str, Any] | str | None = None) -> "OutputConstraint | None":
        """The constraint the keyword arguments of a call ask for (None for none), checked."""
        given = [name for name, value in (("choices", choices), ("regex", regex), ("json_schema", json_schema))
                 if value is not None]
        if len(given) > 1:
            raise ConstraintError(f"at most one constraint per call; got {' and '.join(given)}")
        if choices is not None:
            return cls("choices", _checked_choices(choices))
        if regex is not None:
            if not isinstance(regex, str):
                raise TypeError(f"regex must be a str, not {type(regex).__name__}")
            if len(regex) > MAX_PATTERN_CHARS:
                raise ConstraintError(f"regex is {len(regex)} characters long; the limit is {MAX_PATTERN_CHARS}")
            return cls("regex", pattern=regex)
        if json_schema is not None:
            return cls("json_schema", pattern=_canonical_schema(json_schema))
        return None

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable description (batch fingerprints, reports)."""
        if self.kind == "choices":
            return {"choices": list(self.choices)}
        return {self.kind: self.pattern if self.kind == "regex" else json.loads(self.pattern)}


def _checked_choices(choices: SequenceOf[str]) -> tuple[str, ...]:
    if isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__"):
        raise TypeError(f"choices must be a list of str, not {type(choices).__name__}")
    out = tuple(choices)
    if not out:
        raise ConstraintError("choices is empty: give at least one choice")
    if len(out) > MAX_CHOICES:
        raise ConstraintError(f"{len(out)} choices; the limit is {MAX_CHOICES}")
    for c in out:
        if not isinstance(c, str):
            raise TypeError(f"choices must be str, not {type(c).__name__} ({c!r})")
        if not c:
            raise ConstraintError("choices holds an empty choice: every choice needs at least one character")
        if c[0] in " \t\r\n":
            raise ConstraintError(f"choice {c!r} starts with whitespace: outputs are returned without their "
                                  f"leading whitespace, so it could never be returned as given")
    return out


def _canonical_schema(schema: dict[str, Any] | str) -> str:
    if isinstance(schema, str):
        if len(schema) > MAX_PATTERN_CHARS:
            raise ConstraintError(f"json_schema is {len(schema)} characters long; the limit is {MAX_PATTERN_CHARS}")
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ConstraintError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ConstraintError(f"json_schema must be a JSON object (a dict), not {type(schema).__name__}")
    try:
        text = json.dumps(schema, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"json_schema cannot be written as JSON: {exc}") from None
    if len(text) > MAX_PATTERN_CHARS:
        raise ConstraintError(f"json_schema is {len(text)} characters long; the limit is {MAX_PATTERN_CHARS}")
    return text


class ConstraintState(Protocol):
    """One sequence's progress through a constraint (see the module docstring)."""

    @property
    def complete(self) -> bool: ...

    @property
    def finished(self) -> bool: ...

    def allowed(self) -> np.ndarray: ...

    def advance(self, token: int) -> None: ...

    def take_forced(self, limit: int) -> list[int]: ...

    def text(self) -> bytes: ...


class TokenTable:
    """A vocabulary's token strings as bytes, looked up the ways the choice matcher needs. `eos`:
    the id that ends an output, or several (Qwen3: <|im_end|>, <|endoftext|>), the first being the
    model file's EOS, the one llguidance is told of; a complete choice may end on any of them."""

    def __init__(self, token_bytes: list[bytes], eos: int | SequenceOf[int], special: dict[int, str]):
        self.token_bytes = token_bytes
        ends = [int(eos)] if isinstance(eos, (int, np.integer)) else [int(t) for t in eos]
        if not ends:
            raise ValueError("a token table needs at least one EOS id")
        self.eos = ends[0]
        self.eos_ids: Collection[int] = frozenset(ends)
        self.special = special
        self.by_bytes: dict[bytes, list[int]] = {}
        self.after_whitespace: dict[bytes, list[int]] = {}  # what follows a token's leading whitespace
        whitespace = []
        for i, b in enumerate(token_bytes):
            if not b or i in special:
                continue
            self.by_bytes.setdefault(b, []).append(i)
            rest = b.lstrip(WHITESPACE)
            if not rest:
                whitespace.append(i)
            elif len(rest) < len(b):
                self.after_whitespace.setdefault(rest, []).append(i)
        self.whitespace = np.array(whitespace, np.int64)

    @classmethod
    def of(cls, tokenizer) -> "TokenTable":
        """The table of a tokenizer: its `eos_ids` when it has several (Qwen's), else its `eos_id`."""
        special = {i: name for name, i in tokenizer.special.items()}
        eos = getattr(tokenizer, "eos_ids", None) or tokenizer.eos_id
        return cls([tokenizer.token_bytes(i) for i in range(tokenizer.n_vocab)], eos, special)

    def spells(self, text: bytes) -> bool:
        """Whether some sequence of (non-control) tokens spells text exactly."""
        longest = max((len(b) for b in self.by_bytes), default=0)
        reach = [True] + [False] * len(text)
        for i in range(len(text)):
            if reach[i]:
                for k in range(1, min(longest, len(text) - i) + 1):
                    if text[i:i + k] in self.by_bytes:
                        reach[i + k] = True
        return reach[-1]


class ChoiceMatcher:
    """Choices compiled against a vocabulary; `start()` makes a sequence's state."""

    def __init__(self, choices: tuple[str, ...], table: TokenTable):
        self.table = table
        self.choices = tuple(dict.fromkeys(c.encode("utf-8") for c in choices))
        for c in self.choices:
            if not table.spells(c):
                raise ConstraintError(f"choice {c.decode('utf-8')!r} cannot be spelled with the interpreter's tokens")
        self.complete_set = frozenset(self.choices)
        # The first pick: whitespace tokens, or tokens that start a choice, with or without leading whitespace.
        first: set[int] = set(table.whitespace.tolist())
        for c in self.choices:
            for k in range(1, len(c) + 1):
                first.update(table.by_bytes.get(c[:k], ()))
                first.update(table.after_whitespace.get(c[:k], ()))
        self.first = np.array(sorted(first), np.int64)

    def start(self) -> "ChoiceState":
        return ChoiceState(self)


class ChoiceState:
    def __init__(self, matcher: ChoiceMatcher):
        self.m = matcher
        self.lead: list[bytes] = []  # the whitespace tokens' bytes before the choice began
        self.body: bytes | None = None  # the bytes of the choice so far; None while in the leading whitespace
        self.ended = False  # EOS was picked

    @property
    def complete(self) -> bool:
        return self.body in self.m.complete_set

    @property
    def finished(self) -> bool:
        if self.ended:
            return True
        body = self.body
        return self.complete and not any(len(c) > len(body) and c.startswith(body) for c in self.m.choices)

    def allowed(self) -> np.ndarray:
        if self.finished:
            return np.zeros(0, np.int64)
        if self.body is None:
            return self.m.first
        ids: set[int] = set()
        by_bytes, body = self.m.table.by_bytes, self.body
        for c in self.m.choices:
            if len(c) > len(body) and c.startswith(body):
                for k in range(len(body) + 1, len(c) + 1):
                    ids.update(by_bytes.get(c[len(body):k], ()))
        if self.complete:
            ids.update(self.m.table.eos_ids)
        return np.array(sorted(ids), np.int64)

    def advance(self, token: int) -> None:
        if token in self.m.table.eos_ids and self.complete:
            self.ended = True
            return
        b = self.m.table.token_bytes[token]
        if self.body is None:
            rest = b.lstrip(WHITESPACE)
            if not rest:
                self.lead.append(b)
                return
            self.lead.append(b[:len(b) - len(rest)])
            body = rest
        else:
            body = self.body + b
        if not any(c.startswith(body) for c in self.m.choices):
            raise AssertionError(f"token {token} ({b!r}) leaves the choices")  # the engine picks allowed tokens only
        self.body = body

    def take_forced(self, limit: int) -> list[int]:
        out: list[int] = []
        while len(out) < limit and not self.complete:
            allowed = self.allowed()
            if len(allowed) != 1:
                break
            self.advance(int(allowed[0]))
            out.append(int(allowed[0]))
        return out

    def text(self) -> bytes:
        return b"".join(self.lead) + (self.body or b"")


class GrammarMatcher:
    """A regex or JSON schema compiled by llguidance against a vocabulary."""

    def __init__(self, constraint: OutputConstraint, lltokenizer, table: TokenTable):
        llg = require("llguidance", "constrain")
        if constraint.kind == "regex":
            grammar = llg.LLMatcher.grammar_from_regex(f"[ \\t\\r\\n]*(?:{constraint.pattern})")
            what = f"regex {constraint.pattern!r}"
        else:
            schema = json.loads(constraint.pattern)
            # Compact JSON: with no optional whitespace between tokens, punctuation and keys the
            # schema fixes are forced (evaluated together); an x-guidance the caller gave wins.
            schema.setdefault("x-guidance", {"whitespace_flexible": False})
            grammar = llg.LLMatcher.grammar_from_lark(f"start: /[ \\t\\r\\n]*/ value\nvalue: %json {json.dumps(schema)}")
            what = "json_schema"
        self._template = llg.LLMatcher(lltokenizer, grammar, log_level=0)
        if self._template.is_error():
            raise ConstraintError(f"{what} cannot be compiled: {_first_line(self._template.get_error())}")
        self.table = table
        self.n_vocab = len(table.token_bytes)

    def start(self) -> "GrammarState":
        return GrammarState(self, self._template.deep_copy())


def _first_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines()[:3] if line.strip())


class GrammarState:
    def __init__(self, matcher: GrammarMatcher, llmatcher):
        self.m = matcher
        self.llm = llmatcher
        self.ids: list[int] = []
        self._ff: list[int] | None = None  # the forced tokens of this state, until the next token

    @property
    def complete(self) -> bool:
        return self.llm.is_accepting()

    @property
    def finished(self) -> bool:
        return self.llm.is_stopped()

    def allowed(self) -> np.ndarray:
        if self.finished:
            return np.zeros(0, np.int64)
        forced = self._forced()
        if forced:
            return np.array(forced[:1], np.int64)
        bits = np.unpackbits(np.frombuffer(self.llm.compute_bitmask(), np.uint8), bitorder="little")
        return np.flatnonzero(bits[:self.m.n_vocab])

    def _forced(self) -> list[int]:
        # take_forced and the next step's allowed() ask in the same state: computed once.
        if self._ff is None:
            self._ff = [] if self.llm.is_accepting() else self.llm.compute_ff_tokens()
        return self._ff

    def advance(self, token: int) -> None:
        self._ff = None
        if not self.llm.consume_token(token):
            raise PawError(f"llguidance refused token {token}: {self.llm.get_error()}")  # not an allowed token
        if token not in self.m.table.eos_ids:
            self.ids.append(token)

    def take_forced(self, limit: int) -> list[int]:
        out: list[int] = []
        while len(out) < limit:
            forced = self._forced()[:limit - len(out)]
            if not forced:
                break
            for t in forced:
                self.advance(t)
            out += forced
        return out

    def text(self) -> bytes:
        return b"".join(self.m.table.token_bytes[i] for i in self.ids)


def llguidance_tokenizer(tokenizer, table: TokenTable):
    """llguidance's view of a vocabulary (~0.5 s for GPT-2's 50,257 tokens: build it once per model)."""
    llg = require("llguidance", "constrain")

    class _Vocabulary:  # the attributes llguidance.TokenizerWrapper reads
        eos_token_id = table.eos
        bos_token_id = None
        tokens = [_LLG_SPECIAL + table.special[i].encode("utf-8") if i in table.special else b
                  for i, b in enumerate(table.token_bytes)]
        special_token_ids = sorted(table.special)

        def __call__(self, text: bytes | str) -> list[int]:
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            return tokenizer.encode_plain(text)

    return llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary()), n_vocab=len(table.token_bytes))


class Constraints:
    """A model's constraint compiler: the token table and llguidance's tokenizer built on first
    use, and the last few compiled constraints kept (a map or batch run uses one many times)."""

    KEEP = 16

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._table: TokenTable | None = None
        self._lltokenizer = None
        self._compiled: dict[OutputConstraint, ChoiceMatcher | GrammarMatcher] = {}
        self._lock = threading.Lock()  # calls from several threads compile into one cache

    def compile(self, constraint: OutputConstraint) -> ChoiceMatcher | GrammarMatcher:
        with self._lock:
            return self._compile(constraint)

    def _compile(self, constraint: OutputConstraint) -> ChoiceMatcher | GrammarMatcher:
        found = self._compiled.pop(constraint, None)
        if found is None:
            if self._table is None:
                self._table = TokenTable.of(self.tokenizer)
            if constraint.kind == "choices":
                found = ChoiceMatcher(constraint.choices, self._table)
            else:
                if self._lltokenizer is None:
                    self._lltokenizer = llguidance_tokenizer(self.tokenizer, self._table)
                found = GrammarMatcher(constraint, self._lltokenizer, self._table)
        self._compiled[constraint] = found  # most recently used last
        while len(self._compiled) > self.KEEP:
            self._compiled.pop(next(iter(self._compiled)))
        return found
