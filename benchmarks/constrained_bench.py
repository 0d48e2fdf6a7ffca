"""Constrained outputs: paw_lite against the official runtime's way (llama.cpp + a logits processor), same files, one run.

    python benchmarks/constrained_bench.py [--json] [--repeats N] [--calls N] [--quick]
    paw-lite bench --constrained [--json] ...          (the same, from a source checkout)

The files are interpreter_bench.py's (benchmarks/.cache/interpreter: the full-size random GPT-2 in
Q8_0, the rank-64 adapter, the 250-token-prefix program and its 30-token inputs). Two constraints:
one of four labels (ALERT and QUIET are 2 GPT-2 tokens, INFO and WARNING 1; 3 with a leading
space for QUIET), and a JSON schema {"label": enum of the 4, "severity": enum of 3}.

paw_lite: `fn.generate_ids(text, choices=LABELS)` and `(..., json_schema=SCHEMA)` on the cached
prefix, and `fn.map_ids(texts, choices=LABELS)` over the inputs. The official way, as
programasweights 0.4.14's `runtime_llamacpp.py` (`_call_single_input` and `_generate`) does a call
with a caller's `logits_processor`: rewind to the cached prefix, `eval` the input, then per token
`Llama.sample(temp=0, logits_processor=...)` and `eval` of the picked token. Its processor holds the
same mask logic as paw_lite (`MaskProcessor`: paw_lite's own constraint state for the tokens so
far, every logit outside `state.allowed()` set to -inf), and its loop stops where that state is
finished, as paw_lite does, instead of evaluating one more token for the EOS (or at EOS, or at
the token limit). Throughput of the official way: calls one after another.

Each repeat runs each engine in a fresh process (alternating which goes first); rows report
medians, the ratio column is paw_lite / official. The two engines' outputs are compared token by
token on the same inputs (they can differ only where float32 NumPy and llama.cpp's Q8_0 arithmetic
break a near-tie differently)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from paw_lite.cli.bench import bench_module


# interpreter_bench.py by its path (benchmarks/ is no package), one copy per process.
ib = bench_module(Path(__file__).resolve().with_name("interpreter_bench.py"))

DEFAULT_CACHE = ib.DEFAULT_CACHE
OUTPUT_NAME = "constrained-results.json"  # written into the cache folder unless --output says otherwise
ENGINES = ("paw_lite", "official")
LABELS = ("ALERT", "QUIET", "INFO", "WARNING")
SEVERITIES = ("low", "mid", "high")
SCHEMA = {"type": "object",
          "properties": {"label": {"enum": list(LABELS)}, "severity": {"enum": list(SEVERITIES)}},
          "required": ["label", "severity"], "additionalProperties": False}
# Token limits: a random model may spend a few tokens on leading whitespace before the output; an
# output cut by the limit counts as cut (reported), on both sides alike.
CHOICE_LIMIT = 24
SCHEMA_LIMIT = 48
AGREE_SCHEMA_INPUTS = 16  # schema outputs compared between the engines (beyond the timed calls)
TARGETS = [  # (row key, comparison, bound) from issue 17, "Speed"
    ("choices_call_s", "ratio <=", 0.6),
    ("schema_call_s", "ratio <=", 0.6),
    ("map_calls_s", "ratio >=", 8.0),
]


# -- the official runtime's way ---------------------------------------------------------------

class MaskProcessor:
    """The logits processor a user of the official runtime would pass, with paw_lite's mask logic:
    the constraint state of the output so far (the tokens after the prompt in llama-cpp-python's
    `input_ids`), advanced token by token and rebuilt from scratch when the history is not the
    one it has seen; every logit outside `state.allowed()` becomes -inf."""

    def __init__(self, matcher, n_prompt: int):
        self.matcher, self.n_prompt = matcher, n_prompt
        self._state, self._seen = matcher.start(), []
        self.calls = 0  # logits it masked: one per sampled token
        self.seconds = 0.0  # time spent in it (the mask's share of the official way's call)

    def state(self, out) -> object:
        out = [int(t) for t in out]
        if out[:len(self._seen)] != self._seen:
            self._state, self._seen = self.matcher.start(), []
        for t in out[len(self._seen):]:
            self._state.advance(t)
            self._seen.append(t)
        return self._state

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        self.calls += 1
        allowed = self.state(input_ids[self.n_prompt:]).allowed()
        masked = np.full(len(scores), -np.inf, np.float32)
        masked[allowed] = scores[allowed]
        self.seconds += time.perf_counter() - t
        return masked


def official_generate(llm, prompt_tokens: list[int], limit: int, processor: MaskProcessor) -> list[int]:
    """programasweights 0.4.14 runtime_llamacpp.py `_generate` with a logits processor (its guard
    included: an exception in a ctypes callback would otherwise be swallowed and the measure go
    on with unmasked logits), stopping also where the constraint is finished."""
    import llama_cpp

    if prompt_tokens:
        llm.eval(prompt_tokens)
    error: list[BaseException] = []

    def guarded(input_ids, scores):
        try:
            scores[:] = processor(input_ids, scores)
            return scores
        except BaseException as exc:  # re-raised below, once control is back in Python
            error.append(exc)
            return [0.0] * len(scores)

    processors = llama_cpp.LogitsProcessorList([guarded])
    eos = llm.token_eos()
    out: list[int] = []
    for _ in range(limit):
        token = llm.sample(temp=0, logits_processor=processors)
        if error:
            raise error[0]
        if token == eos:
            break
        out.append(token)
        if processor.state(out).finished:  # complete and cannot go on: paw_lite's stop, no more evaluation
            break
        llm.eval([token])
    return out


def official_call(eng: "ib._Llama", ids: list[int], matcher, limit: int, mask_s: list[float] | None = None) -> list[int]:
    """One call on the cached prefix, as `_call_single_input` does it: n_tokens back to the prefix
    (Llama.eval drops the KV cells past it), then `_generate` on the rest of the prompt. mask_s,
    if given, gets the time the call spent in its logits processor."""
    n_prefix = len(eng.prefix)
    eng.llm.n_tokens = n_prefix
    proc = MaskProcessor(matcher, len(ids))
    out = official_generate(eng.llm, ids[n_prefix:], limit, proc)
    if mask_s is not None:
        mask_s.append(proc.seconds)
    return out


def official_matchers(base: Path) -> tuple[object, object]:
    """paw_lite's compiled choices and schema for the base file's vocabulary (the mask logic)."""
    from paw_lite.constraints import Constraints, OutputConstraint
    from paw_lite.gguf_file import read_index
    from paw_lite.tokenizer import GPT2Tokenizer

    constraints = Constraints(GPT2Tokenizer.from_gguf(read_index(base), base))
    return (constraints.compile(OutputConstraint.of(choices=list(LABELS))),
            constraints.compile(OutputConstraint.of(json_schema=SCHEMA)))


# -- the measuring processes ------------------------------------------------------------------

def _timed_calls(call, n: int) -> tuple[float, list[list[int]]]:
    """The median time of call(i) over inputs 0..n-1, and their outputs."""
    times, outs = [], []
    for i in range(n):
        t = time.perf_counter()
        outs.append(call(i))
        times.append(time.perf_counter() - t)
    return statistics.median(times), outs


def paw_worker(w: ib.Workload, inner: int, n_calls: int, batch_size: int, agree: bool) -> dict:
    import paw_lite
    from paw_lite.constraints import IncompleteOutputError

    res: dict = {}
    calls = w.calls
    with tempfile.TemporaryDirectory() as tmp:
        fn = paw_lite.function(w.program, base_model=w.base, cache_dir=Path(tmp))
        assert fn.prompt_ids(calls[0]["text"]) == calls[0]["ids"]

        def call(i: int, limit: int, **constraint) -> list[int]:
            try:
                return fn.generate_ids(calls[i % len(calls)]["text"], max_tokens=limit, **constraint)
            except IncompleteOutputError as err:  # cut by the limit: its tokens, counted as cut in the report
                return err.ids

        choices = lambda i: call(i, CHOICE_LIMIT, choices=list(LABELS))  # noqa: E731
        schema = lambda i: call(i, SCHEMA_LIMIT, json_schema=SCHEMA)  # noqa: E731
        choices(len(calls) - 1), schema(len(calls) - 1)  # compiles both constraints (kept), outside the timing
        res["choices_call_s"], res["choices_ids"] = _timed_calls(choices, inner)
        res["schema_call_s"], res["schema_ids"] = _timed_calls(schema, inner)
        res["free_call_s"] = _timed_calls(lambda i: fn.generate_ids(calls[i]["text"], max_tokens=ib.OUTPUT_TOKENS), inner)[0]
        texts = [c["text"] for c in calls[:n_calls]]
        t = time.perf_counter()
        outs = fn.map_ids(texts, max_tokens=CHOICE_LIMIT, batch_size=batch_size, choices=list(LABELS), errors="return")
        res["map_calls_s"] = n_calls / (time.perf_counter() - t)
        res["map_ids"] = [o.ids if isinstance(o, IncompleteOutputError) else o for o in outs]
        if agree:
            res["schema_agree_ids"] = [schema(i) for i in range(AGREE_SCHEMA_INPUTS)]
        fn.close()
    return res


def official_worker(w: ib.Workload, inner: int, n_calls: int, batch_size: int, agree: bool) -> dict:
    res: dict = {}
    calls = w.calls
    eng = ib._Llama(w)
    eng.eval_prefix()
    choice_matcher, schema_matcher = official_matchers(w.base)
    mask_s: dict[str, list[float]] = {"choices": [], "schema": []}
    choices = lambda i: official_call(eng, calls[i % len(calls)]["ids"], choice_matcher, CHOICE_LIMIT, mask_s["choices"])  # noqa: E731
    schema = lambda i: official_call(eng, calls[i % len(calls)]["ids"], schema_matcher, SCHEMA_LIMIT, mask_s["schema"])  # noqa: E731
    choices(len(calls) - 1), schema(len(calls) - 1)  # as paw_lite's worker: one untimed call of each first
    res["choices_call_s"], res["choices_ids"] = _timed_calls(choices, inner)
    res["schema_call_s"], res["schema_ids"] = _timed_calls(schema, inner)
    # The mask's own cost inside the timed calls (the processor's time, per call).
    res["choices_mask_s"] = statistics.median(mask_s["choices"][1:])
    res["schema_mask_s"] = statistics.median(mask_s["schema"][1:])
    res["free_call_s"] = _timed_calls(lambda i: eng.call(calls[i]["ids"], ib.OUTPUT_TOKENS), inner)[0]
    t = time.perf_counter()
    outs = [choices(i) for i in range(n_calls)]
    res["map_calls_s"] = n_calls / (time.perf_counter() - t)
    res["map_ids"] = outs
    if agree:
        res["schema_agree_ids"] = [schema(i) for i in range(AGREE_SCHEMA_INPUTS)]
    eng.close()
    return res


WORKERS = {"paw_lite": paw_worker, "official": official_worker}


# -- orchestration and report -----------------------------------------------------------------

# (key, label, unit, lower is better)
ROWS = [
    ("choices_call_s", "one call, choices (4 labels), cached prefix", "s", True),
    ("schema_call_s", "one call, JSON schema (label + severity), cached prefix", "s", True),
    ("map_calls_s", "throughput, choices (paw_lite fn.map; official one call after another)", "calls/s", False),
    ("free_call_s", f"context: one free call ({ib.OUTPUT_TOKENS} tokens, no constraint, no processor)", "s", True),
]


def valid_output(kind: str, text: str) -> bool:
    """Whether an output's text (leading whitespace stripped) is one the constraint allows."""
    text = text.lstrip(" \t\r\n")
    if kind == "choices":
        return text in LABELS
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (isinstance(value, dict) and set(value) == {"label", "severity"} and value["label"] in LABELS
            and value["severity"] in SEVERITIES)


def compare(kind: str, paw: list[list[int]], official: list[list[int]], decode) -> dict:
    """The two engines' outputs on the same inputs: how many are identical, which differ (with
    the position of the first different token), how many of each engine's are valid."""
    differ = []
    for i, (a, b) in enumerate(zip(paw, official)):
        if a != b:
            first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            differ.append({"input": i, "first_difference_at": first, "paw_lite": decode(a), "official": decode(b)})
    return {"kind": kind, "inputs": len(paw), "identical": len(paw) - len(differ), "differ": differ,
            "valid_paw_lite": sum(valid_output(kind, decode(a)) for a in paw),
            "valid_official": sum(valid_output(kind, decode(b)) for b in official),
            "mean_tokens_paw_lite": statistics.mean(len(a) for a in paw) if paw else 0.0}


def run(cache: Path = DEFAULT_CACHE, repeats: int = 3, inner: int = 7, calls: int = 256, batch_size: int = 128,
        log=print) -> dict:
    from paw_lite.gguf_file import read_index
    from paw_lite.tokenizer import GPT2Tokenizer

    opts = argparse.Namespace(inner=inner, calls=calls, batch_size=batch_size)
    w = ib.ensure_workload(cache, calls, log)
    load_before = os.getloadavg()
    samples: dict[str, list[dict]] = {e: [] for e in ENGINES}
    t0 = time.time()
    script = Path(__file__).resolve()
    for rep in range(repeats):
        for engine in (ENGINES if rep % 2 == 0 else ENGINES[::-1]):
            log(f"bench --constrained: repeat {rep + 1}/{repeats}: {engine} ...")
            samples[engine].append(ib._run_worker(engine, cache, opts, agree=rep == 0, script=script))
    rows = []
    for key, label, unit, lower in ROWS:
        vals = {e: [s[key] for s in samples[e]] for e in ENGINES}
        p, o = (statistics.median(vals[e]) for e in ENGINES)
        rows.append({"key": key, "label": label, "unit": unit, "lower_is_better": lower, "paw_lite": p, "official": o,
                     "ratio": p / o, "samples": vals})
    mask = {k: statistics.median(s[f"{k}_mask_s"] for s in samples["official"]) for k in ("choices", "schema")}
    tok = GPT2Tokenizer.from_gguf(read_index(w.base), w.base)
    first = {e: samples[e][0] for e in ENGINES}
    agreement = [compare(kind, first["paw_lite"][key], first["official"][key], tok.decode) for kind, key in
                 (("choices", "map_ids"), ("choices", "choices_ids"), ("json_schema", "schema_ids"),
                  ("json_schema", "schema_agree_ids"))]
    for a, what in zip(agreement, ("fn.map / calls in sequence", "timed calls", "timed calls", "extra calls")):
        a["what"] = what
    # The timed choices calls ran on the map's first inputs: fn.map must give what one call gives.
    paw = first["paw_lite"]
    n = min(len(paw["choices_ids"]), len(paw["map_ids"]))

    return {
        "rows": rows,
        "agreement": agreement,
        "official_mask_s_per_call": mask,
        "map_equals_calls": f"{sum(a == b for a, b in zip(paw['choices_ids'][:n], paw['map_ids'][:n]))}/{n}",
        "labels": list(LABELS), "schema": SCHEMA, "limits": {"choices": CHOICE_LIMIT, "json_schema": SCHEMA_LIMIT},
        "conditions": ib.conditions(repeats, inner, calls, batch_size, load_before, t0),
    }


def format_table(result: dict) -> str:
    lines = ["| measure | paw_lite | official way | paw_lite / official |", "| --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {ib._fmt(r['paw_lite'], r['unit'])} | {ib._fmt(r['official'], r['unit'])} | "
                     f"{r['ratio']:.2f}x |")
    c = result["conditions"]
    lines.append("")
    for a in result["agreement"]:
        line = (f"{a['kind']} ({a['what']}, {a['inputs']} inputs, {a['mean_tokens_paw_lite']:.1f} tokens on average): "
                f"{a['identical']}/{a['inputs']} identical to the official way's; valid {a['valid_paw_lite']}/{a['inputs']} "
                f"(paw_lite), {a['valid_official']}/{a['inputs']} (official)")
        if a["differ"]:
            line += "; differ at inputs " + ", ".join(
                f"{d['input']} (token {d['first_difference_at']}: {d['paw_lite']!r} vs {d['official']!r})" for d in a["differ"][:5])
            line += " ..." if len(a["differ"]) > 5 else ""
        lines.append(line + ".")
    m = result["official_mask_s_per_call"]
    lines += [f"The official way's logits processor (the mask) took {m['choices'] * 1000:.1f} ms of its choices call and "
              f"{m['schema'] * 1000:.1f} ms of its schema call (medians).",
              f"fn.map equals one call at a time on the timed inputs: {result['map_equals_calls']}.",
              f"Medians of {c['repeats']} fresh processes per engine (alternating) x {c['inner']} timed calls (the same "
              f"inputs on both sides); throughput over {c['calls']} inputs (fn.map batch_size {c['batch_size']}); "
              f"llama.cpp n_threads {c['llama_n_threads']}; {c['cpus']} CPUs, load average "
              f"{c['loadavg_before'][0]:.2f} before, {c['loadavg_after'][0]:.2f} after; numpy {c['numpy']}, "
              f"llama-cpp-python {c['llama_cpp_python']}."]
    lines += ib.target_lines(TARGETS, result["rows"])
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    return ib.build_parser(__doc__)


def main_from_args(args: argparse.Namespace) -> dict:
    return ib.main_from_args(args, run, OUTPUT_NAME)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        ib._worker_main(sys.argv[1:], WORKERS)
    else:
        args = build_parser().parse_args()
        result = main_from_args(args)
        print(json.dumps(result, indent=2) if args.json else format_table(result))
