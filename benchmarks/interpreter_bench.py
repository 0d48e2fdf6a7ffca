"""paw_lite's NumPy interpreter against llama.cpp (llama-cpp-python), on the same two files, in one run.

    python benchmarks/interpreter_bench.py [--json] [--repeats N] [--calls N] [--quick]
    paw-lite bench [--json] ...                      (the same, from a source checkout)

The files are generated once into benchmarks/.cache/interpreter (not committed): a full-size random GPT-2 in
the official layout (12 layers, 768 wide, 2048 positions, the real GPT-2 vocabulary, Q8_0 weights
as `gpt2-q8_0.gguf`), a rank-64 Q4_0 `adapter.gguf` covering all 48 modules, and a program whose
prefix is 250 tokens. Speed does not depend on weight values; the EOS row of the embedding is
zero, so EOS never wins the argmax and every call makes exactly the tokens asked for (checked).

Each repeat runs each engine in a fresh process (alternating which goes first) that measures:
cold start (load base + adapter + evaluate the prefix), prefix evaluation, one call (cached
prefix, 30 input tokens + the template suffix, 8 output tokens), decode and prefill rates,
throughput over many calls (paw_lite `fn.map`, llama.cpp one call after another) and peak RSS.
Rows report medians; the ratio column is paw_lite / llama.cpp."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / "benchmarks" / ".cache" / "interpreter"
FORMAT = 1  # bump to regenerate the cached files

PREFIX_TOKENS = 250
INPUT_TOKENS = 30
OUTPUT_TOKENS = 8
DECODE_TOKENS = 64
PREFILL_TOKENS = 512
AGREE_INPUTS, AGREE_TOKENS = 20, 16
EOS = 50256
N_THREADS = 2
ENGINES = ("paw_lite", "llama.cpp")

# Random sentences are drawn from these; each is one GPT-2 token with its leading space (checked).
_WORDS = ("the of and to in is was for on that with as at by from it an be this are or his which had not "
          "but were all have one they their has been more when who will would there time can if out no "
          "other so about what up its new some into only also first after two than then over most many "
          "these world may such her him years used city well any made where each year between both under "
          "while during part state through school group water name few home long found since high small "
          "disk error user login file server network memory timeout warning failed request service "
          "update system process kernel power restart queue cache backup access denied alert quiet").split()


@dataclass(frozen=True)
class Workload:
    base: Path
    adapter: Path
    program: Path
    prefix_ids: list[int]
    calls: list[dict]  # {"text", "ids"}: prompts of PREFIX + INPUT_TOKENS + suffix tokens
    long_call: dict  # a prompt with PREFILL_TOKENS input tokens

    @classmethod
    def load(cls, cache: Path) -> "Workload":
        meta = json.loads((cache / "workload.json").read_text())
        return cls(cache / meta["base"], cache / meta["adapter"], cache / meta["program"], meta["prefix_ids"],
                   meta["calls"], meta["long_call"])


# -- generating the files ---------------------------------------------------------------------

def ensure_workload(cache: Path, n_calls: int, log=print) -> Workload:
    stamp = cache / "workload.json"
    if stamp.exists():
        meta = json.loads(stamp.read_text())
        if meta.get("format") == FORMAT and len(meta["calls"]) >= n_calls:
            return Workload.load(cache)
    cache.mkdir(parents=True, exist_ok=True)
    from paw_lite.testing.vocab import gpt2_vocab, vocab_dir

    from paw_lite.gpt2_layout import GPT2Config
    from paw_lite.tokenizer import GPT2Tokenizer

    tokens, merges, special, eos = gpt2_vocab(vocab_dir())
    assert eos == EOS
    tok = GPT2Tokenizer(tokens, merges, special, eos, "ggml-vocab-gpt-2.gguf")
    config = GPT2Config(n_vocab=len(tokens), n_ctx=2048, n_embd=768, n_head=12, n_layer=12, n_ff=3072, eps=1e-5)
    base, adapter, program = cache / "gpt2-random-q8_0.gguf", cache / "adapter-r64-q4_0.gguf", cache / "bench.paw"
    log(f"bench: writing {base.name} (full-size random GPT-2, Q8_0) ...")
    _write_base(base, config, tokens, merges, special, eos)
    log(f"bench: writing {adapter.name} and {program.name} ...")
    _write_adapter(adapter, config)
    template, prefix_ids = _template(tok)
    _write_program(program, adapter, template)
    prefix, suffix = template.split("{INPUT_PLACEHOLDER}")
    rng = np.random.default_rng(1)
    calls = [_prompt(tok, prefix, suffix, prefix_ids, _sentence(tok, rng, INPUT_TOKENS)) for _ in range(max(n_calls, 256))]
    long_call = _prompt(tok, prefix, suffix, prefix_ids, _sentence(tok, rng, PREFILL_TOKENS))
    meta = {"format": FORMAT, "base": base.name, "adapter": adapter.name, "program": program.name,
            "prefix_ids": prefix_ids, "calls": calls, "long_call": long_call}
    stamp.write_text(json.dumps(meta))
    return Workload.load(cache)


def _write_base(path: Path, config, tokens, merges, special, eos) -> None:
    from paw_lite.convert.gpt2 import write_gpt2_gguf

    rng = np.random.default_rng(0)

    def tensors():
        for name, shape in config.tensor_shapes().items():
            if name.endswith("norm.weight"):
                arr = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            elif name.endswith(".bias"):
                arr = 0.02 * rng.standard_normal(shape, dtype=np.float32)
            elif name == "position_embd.weight":
                arr = 0.01 * rng.standard_normal(shape, dtype=np.float32)
            else:
                arr = 0.02 * rng.standard_normal(shape, dtype=np.float32)
            if name == "token_embd.weight":
                arr[eos] = 0.0  # tied head: EOS scores 0, far below the maximum of 50k random logits
            yield name, arr

    write_gpt2_gguf(path, config, tensors(), tokens, merges, special, eos)


def _write_adapter(path: Path, config) -> None:
    from paw_lite.gpt2_layout import LORA_MODULES
    from paw_lite.lora import write_adapter_gguf

    rng = np.random.default_rng(2)
    tensors = {}
    for i in range(config.n_layer):
        for module in LORA_MODULES:
            d_in, d_out = config.module_dims(module)
            tensors[f"blk.{i}.{module}.weight.lora_a"] = 0.05 * rng.standard_normal((64, d_in), dtype=np.float32)
            tensors[f"blk.{i}.{module}.weight.lora_b"] = 0.05 * rng.standard_normal((d_out, 64), dtype=np.float32)
    write_adapter_gguf(path, tensors, 16.0, "q4_0")


def _template(tok) -> tuple[str, list[int]]:
    """A pseudo-program template whose prefix (the text before the input) is PREFIX_TOKENS tokens."""
    head = "[PSEUDO_PROGRAM]\nTask: classify each log line as ALERT or QUIET."
    tail = "\n\nExamples:\nInput: disk usage at 99% on /var\nOutput: ALERT\n[END_PSEUDO_PROGRAM]\n\n[INPUT]\n"
    words: list[str] = []
    i = 0
    while True:
        prefix = head + "".join(words) + tail
        n = len(tok.encode(prefix))
        if n == PREFIX_TOKENS:
            return prefix + "{INPUT_PLACEHOLDER}\n[END_INPUT]", tok.encode(prefix)
        if n > PREFIX_TOKENS:
            words.pop()
        else:
            words.append(" " + _WORDS[i % len(_WORDS)])
        i += 1


def _sentence(tok, rng, n_tokens: int) -> str:
    words = [w for w in _WORDS if len(tok.encode(" " + w)) == 1]
    return "".join(" " + words[int(rng.integers(len(words)))] for _ in range(n_tokens)).lstrip()


def _prompt(tok, prefix: str, suffix: str, prefix_ids: list[int], text: str) -> dict:
    ids = tok.encode_prompt(prefix, text, suffix)
    assert ids[:len(prefix_ids)] == prefix_ids, "the input must not merge with the prefix"
    return {"text": text, "ids": ids}


def _write_program(path: Path, adapter: Path, template: str) -> None:
    from paw_lite.program import Program

    meta = {"version": 4, "program_id": "0" * 20, "spec": "benchmark program (random weights)", "interpreter": "gpt2",
            "runtime_id": "gpt2-q8_0", "lora_rank": 64, "lora_alpha": 16.0, "pseudo_program_strategy": "provided"}
    Program(meta=meta, template=template, adapter_gguf=adapter.read_bytes(),
            pseudo_program=template.split("\n\n[INPUT]")[0]).save(path)


# -- the measuring processes ------------------------------------------------------------------

def time_threads(threads: list, start) -> float:
    """Start the threads and return the seconds from the moment all of them have reached `start`
    (a threading.Barrier for them and the caller: what they set up before it is not timed)
    until the last one ends."""
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _median_time(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def conditions(repeats: int, inner: int, calls: int, batch_size: int, load_before: tuple, t0: float) -> dict:
    """What a run of this benchmark (or one built on it) was measured under, for its result."""
    import llama_cpp

    return {"repeats": repeats, "inner": inner, "calls": calls, "batch_size": batch_size, "llama_n_threads": N_THREADS,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "llama_cpp_python": llama_cpp.__version__,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "wall_s": time.time() - t0}


def _peak_rss_mb() -> float:
    """Peak RSS in MiB (the keys say _mb; the tables say MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass(frozen=True)
class PawMeasures:
    """How `paw_worker` measures paw_lite, where the benchmarks differ (these defaults are this
    file's, for GPT-2; standard_bench.py's Qwen3 is ~5x slower a call and measures fewer runs)."""

    product_floor: type  # (weights, n_prompt) -> .sample() and .result(n_out): ProductFloor's interface
    decode_tokens: int = DECODE_TOKENS
    agree_inputs: int = AGREE_INPUTS
    agree_tokens: int = AGREE_TOKENS
    map_checked: int = 32  # map outputs compared with one call at a time
    prefix_runs: Callable[[int], int] = lambda inner: inner  # runs of the prefix evaluation, given `inner`
    long_runs: Callable[[int], int] = lambda inner: max(3, inner // 3)  # of the decode and prefill calls
    # a context manager around the timed map; one that records its steps gives an object whose
    # .floor_s(weights) times their products alone (standard_bench.StepLog)
    map_steps: Callable[[], Any] = contextlib.nullcontext


def paw_worker(w: Workload, inner: int, n_calls: int, batch_size: int, agree: bool,
               how: PawMeasures | None = None) -> dict:
    import paw_lite

    how = how or PawMeasures(ProductFloor)
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        fn = paw_lite.function(w.program, base_model=w.base, cache_dir=Path(tmp))
        res["cold_start_s"] = time.perf_counter() - t
        calls = w.calls
        assert fn.prompt_ids(calls[0]["text"]) == calls[0]["ids"]

        def one_call(i=[0]):
            out = fn.generate_ids(calls[i[0] % len(calls)]["text"], max_tokens=OUTPUT_TOKENS)
            assert len(out) == OUTPUT_TOKENS, out
            i[0] += 1

        # The floor is sampled between the calls, so both see the host as it is at that moment.
        floor = how.product_floor(fn._engine.w, len(calls[0]["ids"]) - len(w.prefix_ids))
        call_times = []
        for _ in range(inner):
            call_times.append(_median_time(one_call, 1))
            floor.sample()
        res["one_call_s"] = statistics.median(call_times)
        res.update(floor.result(OUTPUT_TOKENS))
        res["peak_rss_one_program_mb"] = _peak_rss_mb()
        res["prefix_eval_s"] = _median_time(lambda: fn._engine.eval_prefix(fn._prefix_ids), how.prefix_runs(inner))
        text, long_runs = calls[0]["text"], how.long_runs(inner)
        t_long = _median_time(lambda: fn.generate_ids(text, max_tokens=how.decode_tokens + 1), long_runs)
        t_short = _median_time(lambda: fn.generate_ids(text, max_tokens=1), inner)
        res["decode_tok_s"] = how.decode_tokens / (t_long - t_short)
        n_long = len(w.long_call["ids"]) - len(w.prefix_ids)
        res["prefill_tok_s"] = n_long / _median_time(lambda: fn.generate_ids(w.long_call["text"], max_tokens=1),
                                                     long_runs)
        texts = [c["text"] for c in calls[:n_calls]]
        with how.map_steps() as steps:
            t = time.perf_counter()
            outs = fn.map_ids(texts, max_tokens=OUTPUT_TOKENS, batch_size=batch_size)
            res["throughput_calls_s"] = n_calls / (time.perf_counter() - t)
        assert all(len(o) == OUTPUT_TOKENS for o in outs)
        res["peak_rss_run_mb"] = _peak_rss_mb()
        if steps is not None:
            res["throughput_floor_calls_s"] = n_calls / steps.floor_s(fn._engine.w)
        if agree:
            res["agree_ids"] = [fn.generate_ids(c["text"], max_tokens=how.agree_tokens)
                                for c in calls[:how.agree_inputs]]
            one_by_one = [fn.generate_ids(t, max_tokens=OUTPUT_TOKENS) for t in texts[:how.map_checked]]
            res["map_equals_calls"] = [a == b for a, b in zip(outs, one_by_one)]
        fn.close()
        del fn
        t = time.perf_counter()  # again, now with the prefix KV cache file on disk
        fn = paw_lite.function(w.program, base_model=w.base, cache_dir=Path(tmp))
        res["cold_start_cached_prefix_s"] = time.perf_counter() - t
        fn.close()
    return res


class ProductFloor:
    """The float32 products one call cannot do without, timed alone on the loaded weights in the
    engine's own product forms: the prompt's rows through every matrix (the last block's attention
    output and MLP for the last row only, as the engine skips the rest), one head product per output
    token, and every matrix once per decoded token. Nothing else: no attention, norms, GELU or
    Python between them. What these products cost on this host at this moment, which an
    interpreter computing them with NumPy's float32 BLAS does not get below; a measurement, as
    noisy as the host, so it is sampled alongside the calls it is compared with."""

    def __init__(self, weights, n_prompt: int):
        from paw_lite.products import SMALL_PRODUCT_ROWS as _SMALL_PRODUCT_ROWS

        self.weights, self.n_prompt = weights, n_prompt
        layer = weights.layers[0]
        d, n_ff = layer.ffn_up.shape[1], layer.ffn_up.shape[0]
        self.d, self.n_ff = d, n_ff
        rng = np.random.default_rng(0)
        self.x_d = rng.standard_normal((n_prompt, d), dtype=np.float32)
        self.x_ff = rng.standard_normal((n_prompt, n_ff), dtype=np.float32)
        self.out = np.empty((n_prompt, max(3 * d, n_ff)), np.float32)
        self.scratch = np.empty(max(3 * d, n_ff) * min(n_prompt, _SMALL_PRODUCT_ROWS), np.float32)
        self.logits = np.empty(weights.head.shape[0], np.float32)
        self.prompt_s: list[float] = []
        self.token_s: list[float] = []

    def _products(self, n: int) -> None:
        from paw_lite.products import project as _project

        layers, d, n_ff, out = self.weights.layers, self.d, self.n_ff, self.out
        for i, layer in enumerate(layers):
            m = 1 if i == len(layers) - 1 else n
            _project(self.x_d[:n], layer.attn_qkv, out[:n, :3 * d], self.scratch)
            _project(self.x_d[:m], layer.attn_output, out[:m, :d], self.scratch)
            _project(self.x_d[:m], layer.ffn_up, out[:m, :n_ff], self.scratch)
            _project(self.x_ff[:m], layer.ffn_down, out[:m, :d], self.scratch)
        np.matmul(self.weights.head, self.x_d[0], out=self.logits)

    def sample(self) -> None:
        """Time the prompt's products once and one decoded token's once."""
        self.prompt_s.append(_median_time(lambda: self._products(self.n_prompt), 1))
        self.token_s.append(_median_time(lambda: self._products(1), 1))

    def result(self, n_out: int) -> dict:
        prompt, token = statistics.median(self.prompt_s), statistics.median(self.token_s)
        return {"one_call_floor_s": prompt + (n_out - 1) * token, "decode_floor_tok_s": 1.0 / token}


class _Llama:
    """llama-cpp-python used as well as it allows for this job: mmap'd model, the adapter attached
    with llama_adapter_lora_init (lora_path= would turn mmap off), the prefix evaluated once and
    each call rewinding to it (Llama.eval drops the KV cells past n_tokens), logits read in place."""

    def __init__(self, w: Workload):
        import ctypes

        import llama_cpp

        self.lc = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(w.base), n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=N_THREADS,
                                   n_threads_batch=N_THREADS, verbose=False, seed=0)
        self.adapter = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(w.adapter).encode())
        if not self.adapter:
            raise RuntimeError(f"llama.cpp rejected {w.adapter}")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapter)
        if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)):
            raise RuntimeError("llama_set_adapters_lora failed")
        self.n_vocab = self.llm.n_vocab()
        self.prefix = w.prefix_ids

    def eval_prefix(self) -> None:
        self.llm.n_tokens = 0
        self.llm.eval(self.prefix)

    def argmax(self) -> int:
        logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.llm._ctx.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def call(self, ids: list[int], max_tokens: int) -> list[int]:
        P = len(self.prefix)
        self.llm.n_tokens = P
        self.llm.eval(ids[P:])
        out: list[int] = []
        while True:
            token = self.argmax()
            if token == EOS:
                return out
            out.append(token)
            if len(out) >= max_tokens:
                return out
            self.llm.eval([token])

    def close(self) -> None:
        self.llm.close()


def llama_worker(w: Workload, inner: int, n_calls: int, batch_size: int, agree: bool) -> dict:
    res: dict = {}
    t = time.perf_counter()
    eng = _Llama(w)
    eng.eval_prefix()
    res["cold_start_s"] = time.perf_counter() - t
    calls = w.calls

    def one_call(i=[0]):
        out = eng.call(calls[i[0] % len(calls)]["ids"], OUTPUT_TOKENS)
        assert len(out) == OUTPUT_TOKENS, out
        i[0] += 1

    res["one_call_s"] = _median_time(one_call, inner)
    res["peak_rss_one_program_mb"] = _peak_rss_mb()
    res["prefix_eval_s"] = _median_time(eng.eval_prefix, inner)
    eng.eval_prefix()
    decode = []
    for _ in range(max(3, inner // 3)):
        out = eng.call(calls[0]["ids"], 1)
        t = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            eng.llm.eval([out[-1]])
            out.append(eng.argmax())
        decode.append(time.perf_counter() - t)
    res["decode_tok_s"] = DECODE_TOKENS / statistics.median(decode)
    n_long = len(w.long_call["ids"]) - len(w.prefix_ids)
    res["prefill_tok_s"] = n_long / _median_time(lambda: eng.call(w.long_call["ids"], 1), max(3, inner // 3))
    t = time.perf_counter()
    outs = [eng.call(c["ids"], OUTPUT_TOKENS) for c in calls[:n_calls]]
    res["throughput_calls_s"] = n_calls / (time.perf_counter() - t)
    assert all(len(o) == OUTPUT_TOKENS for o in outs)
    res["peak_rss_run_mb"] = _peak_rss_mb()
    if agree:
        res["agree_ids"] = [eng.call(c["ids"], AGREE_TOKENS) for c in calls[:AGREE_INPUTS]]
    eng.close()
    return res


WORKERS = {"paw_lite": paw_worker, "llama.cpp": llama_worker}


# -- orchestration and report -----------------------------------------------------------------

# (key, label, unit, lower is better[, the llama.cpp row it compares with])
ROWS = [
    ("cold_start_s", "cold start (load base + adapter + 250-token prefix)", "s", True),
    ("prefix_eval_s", f"prefix evaluation ({PREFIX_TOKENS} tokens)", "s", True),
    ("one_call_s", f"one call ({INPUT_TOKENS}-token input + suffix, {OUTPUT_TOKENS} output tokens)", "s", True),
    ("decode_tok_s", f"decode, one sequence ({DECODE_TOKENS} tokens)", "tok/s", False),
    ("prefill_tok_s", f"prefill ({PREFILL_TOKENS}-token input after the prefix)", "tok/s", False),
    ("throughput_calls_s", "throughput (paw_lite fn.map; llama.cpp calls in sequence)", "calls/s", False),
    ("peak_rss_one_program_mb", "peak RSS, one loaded program + calls", "MiB", True),
    ("peak_rss_run_mb", "peak RSS, whole run (incl. throughput)", "MiB", True),
    ("cold_start_cached_prefix_s", "cold start, prefix KV cache on disk (paw_lite only)", "s", True),
    ("one_call_floor_s", "one call, paw_lite's float32 products alone (its floor)", "s", True, "one_call_s"),
    ("decode_floor_tok_s", "decode, paw_lite's float32 products alone (its ceiling)", "tok/s", False, "decode_tok_s"),
]


def _run_worker(engine: str, cache: Path, opts: argparse.Namespace, agree: bool, script: Path | None = None) -> dict:
    """One engine's measures in a fresh process: `script --worker engine ...` (this file, or another
    benchmark that takes the same worker options, benchmarks/constrained_bench.py)."""
    cmd = [sys.executable, str(script or Path(__file__).resolve()), "--worker", engine, "--cache", str(cache),
           "--inner", str(opts.inner), "--calls", str(opts.calls), "--batch-size", str(opts.batch_size)]
    if agree:
        cmd.append("--agree")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _agreement(paw: list[list[int]], llama: list[list[int]]) -> dict:
    same = sum(a == b for a, b in zip(paw, llama))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(paw, llama)]
    tokens = sum(x == y for a, b in zip(paw, llama) for x, y in zip(a, b))
    return {"inputs": len(paw), "tokens_each": AGREE_TOKENS, "identical_sequences": same,
            "matching_tokens": tokens, "total_tokens": sum(len(a) for a in paw),
            "mean_tokens_before_first_difference": statistics.mean(prefix)}


def run(cache: Path = DEFAULT_CACHE, repeats: int = 3, inner: int = 7, calls: int = 256, batch_size: int = 128,
        log=print) -> dict:
    opts = argparse.Namespace(inner=inner, calls=calls, batch_size=batch_size)
    ensure_workload(cache, calls, log)
    load_before = os.getloadavg()
    samples: dict[str, list[dict]] = {e: [] for e in ENGINES}
    t0 = time.time()
    for rep in range(repeats):
        for engine in (ENGINES if rep % 2 == 0 else ENGINES[::-1]):
            log(f"bench: repeat {rep + 1}/{repeats}: {engine} ...")
            samples[engine].append(_run_worker(engine, cache, opts, agree=rep == 0))
    rows = []
    for key, label, unit, lower, *against in ROWS:
        keys = {"paw_lite": key, "llama.cpp": against[0] if against else key}
        vals = {e: [s[keys[e]] for s in samples[e] if keys[e] in s] for e in ENGINES}
        med = {e: (statistics.median(v) if v else None) for e, v in vals.items()}
        p, l = med["paw_lite"], med["llama.cpp"]
        rows.append({"key": key, "label": label, "unit": unit, "lower_is_better": lower, "paw_lite": p, "llama_cpp": l,
                     "ratio": (p / l) if p is not None and l else None, "samples": vals})

    result = {
        "rows": rows,
        "agreement": _agreement(samples["paw_lite"][0]["agree_ids"], samples["llama.cpp"][0]["agree_ids"]),
        "map_equals_one_by_one": f"{sum(samples['paw_lite'][0]['map_equals_calls'])}/{len(samples['paw_lite'][0]['map_equals_calls'])}",
        "conditions": conditions(repeats, inner, calls, batch_size, load_before, t0),
    }
    return result


TARGETS = [  # (row key, comparison, bound[, the row of paw_lite's floor for it]) from the performance issue
    ("one_call_s", "ratio <=", 1.0, "one_call_floor_s"),
    ("throughput_calls_s", "ratio >=", 5.0),
    ("cold_start_s", "ratio <=", 3.0),
    ("peak_rss_one_program_mb", "paw_lite <=", 800e6 / 2**20),  # 800 MB (763 MiB; RSS is measured in MiB)
]


def target_bound(key: str, bound: float) -> str:
    """A target's bound as the table shows it: memory in whole MiB, ratios as they are."""
    return f"{bound:.0f} MiB" if key.startswith("peak_rss") else f"{bound:g}"


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "s":
        return f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"
    return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"


def format_table(result: dict) -> str:
    lines = ["| measure | paw_lite | llama.cpp | paw_lite / llama.cpp |", "| --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['label']} | {_fmt(r['paw_lite'], r['unit'])} | {_fmt(r['llama_cpp'], r['unit'])} | {ratio} |")
    a = result["agreement"]
    c = result["conditions"]
    lines += ["", f"Greedy agreement with llama.cpp ({a['inputs']} inputs x {a['tokens_each']} tokens): "
                  f"{a['identical_sequences']}/{a['inputs']} identical sequences, {a['matching_tokens']}/{a['total_tokens']} "
                  f"tokens equal position by position, {a['mean_tokens_before_first_difference']:.1f} tokens before the first "
                  f"difference on average.",
              f"fn.map equals one call at a time on the benchmark model: {result['map_equals_one_by_one']} inputs.",
              f"Medians of {c['repeats']} fresh processes per engine (alternating) x {c['inner']} timed runs; throughput over "
              f"{c['calls']} calls (fn.map batch_size {c['batch_size']}); llama.cpp n_threads {c['llama_n_threads']}; "
              f"{c['cpus']} CPUs, load average {c['loadavg_before'][0]:.2f} before, {c['loadavg_after'][0]:.2f} after; "
              f"numpy {c['numpy']}, llama-cpp-python {c['llama_cpp_python']}."]
    lines += target_lines(TARGETS, result["rows"])
    return "\n".join(lines)


def target_lines(targets: list[tuple], rows: list[dict]) -> list[str]:
    """A line per target (row key, comparison, bound[, the row of paw_lite's float32 floor for it]):
    met or not, and for one not met, the ratio paw_lite's float32 products alone reach."""
    by_key = {r["key"]: r for r in rows}
    lines = []
    for key, how, bound, *floor in targets:
        r = by_key[key]
        value = r["ratio"] if how.startswith("ratio") else r["paw_lite"]
        ok = value is not None and (value <= bound if how.endswith("<=") else value >= bound)
        line = f"target {key}: {how} {target_bound(key, bound)}: {'met' if ok else 'NOT met'} ({value:.2f})"
        if not ok and floor and by_key.get(floor[0], {}).get("ratio") is not None:
            line += f"; paw_lite's float32 products alone: {by_key[floor[0]]['ratio']:.2f}"
        lines.append(line)
    return lines


def build_parser(doc: str = __doc__) -> argparse.ArgumentParser:
    """`paw-lite bench`'s options, for this script or another built on it (its docstring given)."""
    from paw_lite.cli.bench import add_arguments

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_arguments(parser)
    return parser


def main_from_args(args: argparse.Namespace, runner=None, output_name: str = "results.json") -> dict:
    """Run the benchmark (`runner`, this script's `run` by default) and write its JSON result."""
    from paw_lite.atomic import atomic_path, check_writable

    args.cache = args.cache or DEFAULT_CACHE
    if args.quick:
        args.repeats, args.inner, args.calls = 1, 3, 32
    out = args.output or args.cache / output_name
    check_writable(args.cache, "--cache", into=True)  # before minutes of work, not after
    check_writable(out, "--output")
    log = (lambda msg: print(msg, file=sys.stderr))
    result = (runner or run)(args.cache, args.repeats, args.inner, args.calls, args.batch_size, log)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _worker_main(argv: list[str], workers: dict = WORKERS) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=tuple(workers), required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--inner", type=int, required=True)
    p.add_argument("--calls", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--agree", action="store_true")
    a = p.parse_args(argv)
    res = workers[a.worker](Workload.load(a.cache), a.inner, a.calls, a.batch_size, a.agree)
    print(json.dumps(res))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        _worker_main(sys.argv[1:])
    else:
        args = build_parser().parse_args()
        result = main_from_args(args)
        print(json.dumps(result, indent=2) if args.json else format_table(result))
