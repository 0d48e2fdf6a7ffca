"""Running a program: `paw_lite.function(program)` returns a callable fuzzy function."""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import paths, prefix_cache
from .base_model import BaseModel
from .constraints import WHITESPACE, Constraints, IncompleteOutputError, OutputConstraint
from .engine import Engine, Sequence
from .errors import ContextOverflowError, IncompatibleModelError, PawError
from .families import check_fits
from .lora import LoraAdapter
from .parallel_map import DEFAULT_BATCH_SIZE, MapPool
from .program import ADAPTER, Program

log = logging.getLogger("paw_lite")

def load_adapter(program: Program, base: BaseModel) -> LoraAdapter:
    """Parse the program's adapter.gguf (from memory: no temporary file)."""
    adapter = LoraAdapter.from_program(program, base.config)
    for key, value in (("lora_rank", adapter.rank), ("lora_alpha", adapter.alpha)):
        declared = program.meta.get(key)
        if declared is not None and float(declared) != float(value):
            raise IncompatibleModelError(f"{program.source}: meta.json says {key} {declared} but {ADAPTER} has {value}")
    return adapter


@dataclass(frozen=True)
class PreparedCall:
    """A call ready for an engine (`PawFunction.prepare`): its sequence (None when there is
    nothing to generate: max_tokens 0, or a full context), its prompt's length in tokens, and
    its constraint, compiled."""

    sequence: Sequence | None
    prompt_tokens: int
    constraint: OutputConstraint | None
    matcher: Any = field(default=None, repr=False)


class PawFunction:
    """A program bound to an interpreter: call it on text, or map it over many texts.

    Calls are serialised by a lock: one function owns one engine. For many inputs use `map`,
    which evaluates them together on every core; functions in parallel threads compete for the
    same cores (NumPy's BLAS already uses them all) and each holds its own merged weights."""

    def __init__(self, program: Program, base: BaseModel, *, cache_dir: Path | None, owns_base: bool):
        check_fits(program.family, base.family, program.source, str(base.source))
        self.program = program
        self.family = base.family
        self.config = base.config
        self.tokenizer = base.tokenizer
        started = time.perf_counter()
        adapter = load_adapter(program, base)
        # The LoRA is merged into the engine's weights. A base loaded for this function alone is merged
        # in its own memory (never held twice); a shared base stays untouched, so each function on it
        # holds its own merged copy of the block matrices (~340 MB for GPT-2 124M): sharing saves the
        # load and the embeddings, not the matrices.
        self._engine: Engine | None = base.engine(adapter.pairs, adapter.scale, consume=owns_base)
        log.info("%s: LoRA rank %d (alpha %g) on %d modules merged in %.2f s", program.source, adapter.rank, adapter.alpha,
                 len(adapter.pairs), time.perf_counter() - started)
        self._map_pool = MapPool(self._engine)  # fn.map's workers: this engine and forks of it
        self._prefix_ids = self.tokenizer.encode(program.prefix)
        self._suffix_ids = self.tokenizer.encode(program.suffix)
        self._template_bytes = len(program.template.encode("utf-8"))
        if len(self._prefix_ids) + len(self._suffix_ids) >= self.config.n_ctx:
            raise ContextOverflowError(
                f"{program.source}: the template alone is {len(self._prefix_ids) + len(self._suffix_ids)} tokens; "
                f"the interpreter's context holds {self.config.n_ctx}")
        self._constraints = Constraints(self.tokenizer)
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread in a call, to refuse a call from inside it
        adapter_sha = hashlib.sha256(program.adapter_gguf).hexdigest()
        self.prefix_cache_key = prefix_cache.cache_key(self.family.name, base.fingerprint, adapter_sha, self._prefix_ids)
        # What decides the outputs, so stored results can tell which function made them.
        self.fingerprint = hashlib.sha256("\0".join(
            (base.fingerprint, adapter_sha, program.template)).encode("utf-8", "surrogatepass")).hexdigest()
        self._engine.set_prefix(*self._load_or_build_prefix(cache_dir))

    # -- public -------------------------------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self._engine is None else f"{self.config.n_layer}-layer {self.family.model}"
        return f"<PawFunction {self.program.source} ({self.program.program_id or 'no program id'}) on {state}>"

    @property
    def spec(self) -> str | None:
        return self.program.spec

    @property
    def pseudo_program(self) -> str | None:
        return self.program.pseudo_program

    def __call__(self, text: str, max_tokens: int | None = None, on_tokens: Callable[[int], None] | None = None, *,
                 choices: list[str] | None = None, regex: str | None = None,
                 json_schema: dict[str, Any] | str | None = None) -> str:
        """The program's output for one input. on_tokens(n) is called as tokens are made (n new
        ones each time): progress for long outputs.

        At most one constraint: `choices` (the output is one of them), `regex` (the output fully
        matches it) or `json_schema` (the output is JSON text valid under it, returned as a str).
        A constrained output is exact and complete or an error: IncompleteOutputError when
        max_tokens (or the context end) cuts it first; ConstraintError, before any evaluation,
        for a constraint that cannot be used. See `paw_lite.constraints`."""
        constraint = OutputConstraint.of(choices, regex, json_schema)
        return self._text(self.generate_ids(text, max_tokens, on_tokens, choices=choices, regex=regex,
                                            json_schema=json_schema), constraint)

    def generate_ids(self, text: str, max_tokens: int | None = None,
                     on_tokens: Callable[[int], None] | None = None, *, choices: list[str] | None = None,
                     regex: str | None = None, json_schema: dict[str, Any] | str | None = None) -> list[int]:
        """The greedy output token ids for one input (EOS not included); constraints as `__call__`."""
        self._live_engine()  # a closed function refuses every call, even one with nothing to generate
        _check_callback("on_tokens", on_tokens, "taking the number of new tokens")
        matcher = self._matcher(OutputConstraint.of(choices, regex, json_schema))
        seq = self._sequence(self.prompt_ids(text), _checked_max_tokens(max_tokens), matcher)
        ids: list[int] = []
        if seq is not None:
            with self._exclusive():
                ids = self._live_engine().generate([seq], self.tokenizer.eos_ids, on_tokens=on_tokens)[0]
        outcome = self._outcome(seq, ids, matcher, "the output")
        if isinstance(outcome, PawError):
            raise outcome
        return outcome

    def map(self, texts: Iterable[str], max_tokens: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
            workers: int | None = None, on_result: Callable[[int, str], None] | None = None, *,
            choices: list[str] | None = None, regex: str | None = None,
            json_schema: dict[str, Any] | str | None = None, errors: str = "raise") -> list[str]:
        """Outputs for many inputs, the same as calling the function on each. Up to batch_size
        inputs are in flight at once, evaluated together against the shared prefix, each stopping
        at its own EOS and handing its place to the next input. Fewer are in flight when their keys
        and values would take more than MAP_KV_BUDGET (1 GiB; 384 MiB on Qwen3): long inputs.

        workers: threads sharing the inputs; None for one per core. With more than one, NumPy's
        BLAS is held at one thread while they run (process-wide, see `paw_lite.blas_threads`), so
        other NumPy work in the process runs single-threaded meanwhile; workers=1 leaves it alone.

        on_result(i, output): called as input i's output is final, in the order they finish, from
        the worker that made it (calls never overlap): to keep results before the whole map ends.

        choices / regex / json_schema: one constraint for every input, as in `__call__`. An input
        whose constrained output is cut short is an IncompleteOutputError: with errors="raise"
        (the default) the first one is raised once every input is done; with errors="return" it
        takes that input's place in the list (and is what on_result gets), every other input
        getting its output."""
        _check_callback("on_result", on_result, "taking (input index, output)")
        constraint = OutputConstraint.of(choices, regex, json_schema)
        done = None if on_result is None else (lambda i, ids: on_result(i, self._text(ids, constraint)))
        return [self._text(ids, constraint) for ids in self.map_ids(
            texts, max_tokens, batch_size, workers, done, choices=choices, regex=regex, json_schema=json_schema,
            errors=errors)]

    def map_ids(self, texts: Iterable[str], max_tokens: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                workers: int | None = None, on_result: Callable[[int, list[int]], None] | None = None, *,
                choices: list[str] | None = None, regex: str | None = None,
                json_schema: dict[str, Any] | str | None = None, errors: str = "raise") -> list[list[int]]:
        """The greedy output token ids of many inputs (see `map`)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError(f"texts must be a list (or other iterable) of str, not one {type(texts).__name__}: "
                            f"for a single input call the function itself, fn(text)")
        _check_callback("on_result", on_result, "taking (input index, output ids)")
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
        batch_size = _checked_count("batch_size", batch_size)
        workers = None if workers is None else _checked_count("workers", workers)
        max_tokens = _checked_max_tokens(max_tokens)
        self._live_engine()
        matcher = self._matcher(OutputConstraint.of(choices, regex, json_schema))
        seqs = []
        for i, text in enumerate(texts):  # every input checked before any work
            try:
                seqs.append(self._sequence(self.prompt_ids(text), max_tokens, matcher))
            except (PawError, TypeError) as exc:  # which of thousands of inputs it was
                raise type(exc)(f"input {i} of the map: {exc}") from None

        def outcome(i: int, ids: list[int]) -> list[int] | PawError:
            return self._outcome(seqs[i], ids, matcher, f"input {i} of the map")

        report = None
        if on_result is not None:
            def report(i: int, ids: list[int]) -> None:
                result = outcome(i, ids)
                if not isinstance(result, PawError) or errors == "return":
                    on_result(i, result)

            for i, s in enumerate(seqs):
                if s is None:  # nothing to generate (max_tokens 0, or the context is full)
                    report(i, [])
        outs: list[list[int]] = [[] for _ in seqs]
        if any(s is not None for s in seqs):
            with self._exclusive():
                self._live_engine()
                outs = self._map_pool.generate(seqs, self.tokenizer.eos_ids, batch_size, workers, report)
        results = [outcome(i, ids) for i, ids in enumerate(outs)]
        if errors == "raise":
            for r in results:
                if isinstance(r, PawError):
                    raise r
        return results

    # -- for servers: calls evaluated by a caller-run batch -------------------------------------

    def prepare(self, text: str, max_tokens: int | None = None, *, choices: list[str] | None = None,
                regex: str | None = None, json_schema: dict[str, Any] | str | None = None) -> "PreparedCall":
        """One call made ready for an engine the caller runs (`engine()`, a batch of many calls):
        checked, tokenized, its constraint compiled, exactly as `__call__` does before evaluating.
        Its output is `finish(call, ids)` of the ids the engine makes for `call.sequence`."""
        self._live_engine()
        constraint = OutputConstraint.of(choices, regex, json_schema)
        matcher = self._matcher(constraint)
        ids = self.prompt_ids(text)
        seq = self._sequence(ids, _checked_max_tokens(max_tokens), matcher)
        if seq is not None:
            self._live_engine().check(seq)
        return PreparedCall(seq, len(ids), constraint, matcher)

    def finish(self, call: "PreparedCall", ids: list[int]) -> str:
        """The output `__call__` returns for these ids (IncompleteOutputError as it raises it)."""
        outcome = self._outcome(call.sequence, ids, call.matcher, "the output")
        if isinstance(outcome, PawError):
            raise outcome
        return self._text(outcome, call.constraint)

    def partial_text(self, call: "PreparedCall", ids: list[int]) -> str:
        """The text of ids made so far, as `finish` would give it, less what later tokens may
        still change: its trailing whitespace (stripped when unconstrained) and an unfinished
        UTF-8 character. Each call's text starts with the previous one's: a stream's pieces."""
        text = self.tokenizer.decode(ids)
        text = text.lstrip() if call.constraint is None else text.lstrip(WHITESPACE.decode())
        text = text.rstrip("\ufffd")  # a character whose later bytes are in the next token
        return text.rstrip() if call.constraint is None else text

    @contextmanager
    def engine(self) -> Iterator[Engine]:
        """The function's engine for the block, alone (calls from other threads wait)."""
        with self._exclusive():
            yield self._live_engine()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One call at a time uses the engine's buffers; other threads wait their turn. A call from
        inside a call (its on_tokens callback) would wait for itself for ever: refused."""
        # Read without the lock: only the thread holding it can find its own id there.
        if self._holder == threading.get_ident():
            raise PawError("the function was called from inside one of its own calls (from its on_tokens or "
                           "on_result callback?); call it again after that call or map returns")
        with self._lock:
            self._holder = threading.get_ident()
            try:
                yield
            finally:
                self._holder = None

    def close(self) -> None:
        self._engine = None
        self._map_pool = None

    def __enter__(self) -> "PawFunction":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prompt_ids(self, text: str) -> list[int]:
        """The full prompt's token ids, checked against the context size."""
        if not isinstance(text, str):
            raise TypeError(f"input must be str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PawError(f"input is not valid Unicode: {exc.reason} at position {exc.start}") from None
        # No token spans more than max_token_bytes bytes, so a prompt this long cannot fit: refuse it
        # before spending seconds tokenizing megabytes.
        n_bytes = self._template_bytes + len(text.encode("utf-8"))
        at_least = -(-n_bytes // self.tokenizer.max_token_bytes)
        if at_least >= self.config.n_ctx:
            raise ContextOverflowError(
                f"input is {len(text.encode('utf-8'))} bytes, at least {at_least} tokens with the template; the interpreter's "
                f"context holds {self.config.n_ctx} tokens")
        ids = self.tokenizer.encode_prompt(self.program.prefix, text, self.program.suffix)
        if len(ids) >= self.config.n_ctx:
            n_fixed = len(self._prefix_ids) + len(self._suffix_ids)
            raise ContextOverflowError(
                f"prompt is {len(ids)} tokens (template {n_fixed} + input {len(ids) - n_fixed}); the interpreter's "
                f"context holds {self.config.n_ctx}, leaving room for inputs up to {self.config.n_ctx - n_fixed - 1} tokens")
        return ids

    # -- internals ----------------------------------------------------------------------------

    @property
    def _prefix_k(self) -> np.ndarray:
        return self._live_engine().prefix_k

    @property
    def _prefix_v(self) -> np.ndarray:
        return self._live_engine().prefix_v

    def _live_engine(self) -> Engine:
        if self._engine is None:
            raise PawError(f"{self.program.source}: this function was closed")
        return self._engine

    def _matcher(self, constraint: OutputConstraint | None):
        """The compiled constraint (errors before any evaluation), or None."""
        return None if constraint is None else self._constraints.compile(constraint)

    def _text(self, ids: list[int] | PawError, constraint: OutputConstraint | None) -> str | PawError:
        """The output text: stripped; a constrained one only of its leading whitespace (a choice
        or a regex match may end in whitespace)."""
        if isinstance(ids, PawError):
            return ids
        text = self.tokenizer.decode(ids)
        return text.strip() if constraint is None else text.lstrip(WHITESPACE.decode())

    def _outcome(self, seq: Sequence | None, ids: list[int], matcher, what: str) -> list[int] | PawError:
        """ids, or the IncompleteOutputError of a constrained output cut before it was complete."""
        if matcher is None or (seq is not None and seq.constraint.complete):
            return ids
        partial = self.tokenizer.decode(ids)
        return IncompleteOutputError(
            f"{what} was cut after {len(ids)} tokens before it was complete (partial output {partial!r}); "
            f"raise max_tokens, or shorten the input if the context end cut it", partial, ids)

    def _sequence(self, ids: list[int], max_tokens: int | None, matcher=None) -> Sequence | None:
        """What the engine evaluates for a prompt: the tokens after the part it shares with the
        cached prefix, how many tokens it may generate (None when that is zero) and, with a
        compiled constraint, the sequence's own state of it. max_tokens has passed
        `_checked_max_tokens`."""
        room = self.config.n_ctx - len(ids)
        limit = room if max_tokens is None else min(max_tokens, room)
        if limit <= 0:
            return None
        # The prompt starts with the prefix's ids (tokenized alone, see `prompt_ids`), so all of the
        # cached prefix is shared; at least one token is evaluated, for the first output's logits.
        shared = 0
        for a, b in zip(ids, self._prefix_ids):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(ids) - 1)
        return Sequence(ids[shared:], shared, limit, None if matcher is None else matcher.start())

    def _load_or_build_prefix(self, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
        n = len(self._prefix_ids)
        kv = self._live_engine().model.kv_shape
        shape = (kv.n_layer, kv.n_head, n, kv.head_dim)
        path = prefix_cache.cache_path(cache_dir, self.prefix_cache_key) if cache_dir is not None else None
        if path is not None:
            cached = prefix_cache.load(path, self.prefix_cache_key, shape)
            if cached is not None:
                log.info("prefix: %d tokens' keys and values read from %s", n, path)
                return cached
        started = time.perf_counter()
        k, v = self._live_engine().eval_prefix(self._prefix_ids)
        log.info("prefix: %d tokens evaluated in %.2f s%s", n, time.perf_counter() - started,
                 "" if path is not None else " (prefix cache off)")
        if path is not None:
            try:
                prefix_cache.save(path, self.prefix_cache_key, k, v)
                log.info("prefix: cached in %s", path)
            except OSError as exc:
                prefix_cache.log.warning("cannot write prefix cache %s (%s); continuing without it", path, exc)
        return k, v


def _check_callback(name: str, value: object, taking: str) -> None:
    """A callback is refused before any work, not when it is first called."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a function {taking}, or None; got {type(value).__name__}")


def _checked_count(name: str, value: object) -> int:
    """A positive integer option (Python or NumPy integer), or a ValueError naming it."""
    return _checked_integer(name, value, 1, "a positive integer")


def _checked_max_tokens(value: object) -> int | None:
    """None (until EOS or the context end) or an integer >= 0; anything else is refused here rather
    than rounded or failing deep in the engine."""
    return None if value is None else _checked_integer("max_tokens", value, 0, "an integer >= 0, or None for no limit")


def _checked_integer(name: str, value: object, minimum: int, expected: str) -> int:
    try:
        number = operator.index(value)  # ints and NumPy integers, not floats or strings
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < minimum:
        raise ValueError(f"{name} must be {expected}, not {value!r}")
    return number


def function(program: str | os.PathLike[str] | Program, base_model: str | os.PathLike[str] | BaseModel | None = None,
             *, cache_dir: str | os.PathLike[str] | None = None, prefix_cache_enabled: bool = True) -> PawFunction:
    """Load a program (a `.paw` file, a program folder or a Program) and bind it to its interpreter.

    base_model: the interpreter of the program's family (GPT-2 for Compact programs, Qwen3 for
    Standard ones) as a GGUF file or HF folder, a loaded BaseModel, or None for the program's
    runtime (`<runtime_id>.gguf`) in the models directory ($PAW_LITE_MODELS or the user cache).
    cache_dir: where prefix KV caches live ($PAW_LITE_CACHE or the user cache by default)."""
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):  # before seconds of loading
        raise TypeError(f"cache_dir must be a path (str or os.PathLike) or None, not {type(cache_dir).__name__}")
    prog = program.checked() if isinstance(program, Program) else Program.load(program)
    if isinstance(base_model, BaseModel):
        base, owns = base_model, False
    else:
        started = time.perf_counter()
        interpreter = paths.resolve_interpreter(base_model, prog.runtime_id)
        base, owns = BaseModel.for_one_function(interpreter), True
        log.info("interpreter: %s loaded in %.2f s", interpreter, time.perf_counter() - started)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else paths.cache_dir()
    return PawFunction(prog, base, cache_dir=directory if prefix_cache_enabled else None, owns_base=owns)
