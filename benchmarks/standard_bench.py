"""Standard programs: paw_lite's NumPy Qwen3 against the official runtime's way (llama.cpp), same files, one run.

    python benchmarks/standard_bench.py [--json] [--repeats N] [--calls N] [--quick]
    paw-lite bench --standard [--json] ...          (the same, from a source checkout)

The files are generated once into benchmarks/.cache/standard (not committed): a Qwen3-0.6B-shaped
interpreter with random weights (28 layers, 1024 wide, 16 query / 8 key-value heads of 128, FFN
3072, tied embeddings, the real Qwen vocabulary padded to 151,936 rows as the published file is),
written as F16 and quantized to Q6_K by llama.cpp's own quantizer (the published file's type), a
rank-64 Q4_0 `adapter.gguf` on all 196 modules (28 layers x 7), and a Standard program (the Qwen
chat template, thinking off) whose prefix is 250 tokens. Speed does not depend on weight values;
the embedding rows of `<|im_end|>` and `<|endoftext|>` are zero, so neither EOS wins the argmax
and every call makes exactly the tokens asked for (checked).

paw_lite: `paw_lite.function(program, base_model=...)`, `fn.generate_ids` on the cached prefix and
`fn.map_ids` over the inputs. The official way, as programasweights 0.4.14's
`runtime_llamacpp.py` runs a call: rewind to the evaluated prefix, `eval` input + suffix, then
`Llama.sample(temp=0)` and `eval` of the picked token until EOS or the limit; its throughput is
those calls one after another. interpreter_bench.py's llama.cpp set-up (`_Llama`: mmap'd model,
the adapter attached at scale 1), workload format, worker processes and option parsing are
imported, not copied.

Each repeat runs each engine in a fresh process (alternating which goes first); rows report
medians, the ratio column is paw_lite / official. Peak RSS is each worker process's own."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from paw_lite.cli.bench import bench_module


# interpreter_bench.py by its path (benchmarks/ is no package), one copy per process.
ib = bench_module(Path(__file__).resolve().with_name("interpreter_bench.py"))

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / "benchmarks" / ".cache" / "standard"
OUTPUT_NAME = "standard-results.json"  # written into the cache folder unless --output says otherwise
FORMAT = 1  # bump to regenerate the cached files
ENGINES = ("paw_lite", "official")
PREFIX_TOKENS = ib.PREFIX_TOKENS  # 250, as for GPT-2
INPUT_TOKENS, OUTPUT_TOKENS, PREFILL_TOKENS = ib.INPUT_TOKENS, ib.OUTPUT_TOKENS, ib.PREFILL_TOKENS
DECODE_TOKENS = 32
AGREE_INPUTS, AGREE_TOKENS = 8, 8
RANK = 64
TARGETS = [  # (row key, comparison, bound[, the row of paw_lite's float32 floor for it]) from issue 20, "Proof"
    ("throughput_calls_s", "ratio >=", 3.0, "throughput_floor_calls_s"),
    ("peak_rss_run_mb", "paw_lite <=", 3.2e9 / 2**20),  # 3.2 GB: 3,052 MiB (RSS is measured in MiB)
]


def qwen3_0_6b_config():
    """Qwen3-0.6B's hyperparameters (its config.json; the published GGUF holds the same)."""
    from paw_lite.qwen3_layout import Qwen3Config

    return Qwen3Config(n_vocab=151936, n_ctx=40960, n_embd=1024, n_ff=3072, n_layer=28, n_head=16, n_head_kv=8,
                       head_dim=128, eps=1e-6, rope_theta=1e6, tied=True)


# -- generating the files ---------------------------------------------------------------------

def ensure_workload(cache: Path, n_calls: int, log=print):
    stamp = cache / "workload.json"
    if stamp.exists():
        meta = json.loads(stamp.read_text())
        if meta.get("format") == FORMAT and len(meta["calls"]) >= n_calls:
            return ib.Workload.load(cache)
    cache.mkdir(parents=True, exist_ok=True)
    from paw_lite.families import STANDARD
    from paw_lite.gguf_file import read_index
    from paw_lite.tokenizer import BPETokenizer

    config = qwen3_0_6b_config()
    base, adapter, program = cache / "qwen3-0.6b-random-q6_k.gguf", cache / "adapter-r64-q4_0.gguf", cache / "bench.paw"
    if not base.exists():
        log(f"bench: writing {base.name} (Qwen3-0.6B-shaped, random weights: F16, then Q6_K by llama.cpp) ...")
        _write_base(base, config)
    tok = BPETokenizer.from_gguf(read_index(base), base, STANDARD)
    log(f"bench: writing {adapter.name} (rank {RANK}, 196 modules, Q4_0) and {program.name} ...")
    _write_adapter(adapter, config)
    template, prefix_ids = _template(tok)
    _write_program(program, adapter, template)
    prefix, suffix = template.split("{INPUT_PLACEHOLDER}")
    rng = np.random.default_rng(1)
    calls = [ib._prompt(tok, prefix, suffix, prefix_ids, ib._sentence(tok, rng, INPUT_TOKENS))
             for _ in range(max(n_calls, 256))]
    long_call = ib._prompt(tok, prefix, suffix, prefix_ids, ib._sentence(tok, rng, PREFILL_TOKENS))
    meta = {"format": FORMAT, "base": base.name, "adapter": adapter.name, "program": program.name,
            "prefix_ids": prefix_ids, "calls": calls, "long_call": long_call}
    stamp.write_text(json.dumps(meta))
    return ib.Workload.load(cache)


def _vocab():
    """The Qwen3 vocabulary as the published GGUF lays it out: the 151,643 byte-level BPE tokens of
    llama.cpp's ggml-vocab-qwen2.gguf, Qwen3's 26 added tokens (CONTROL, or USER_DEFINED for the
    non-special ones such as <think>), then [PAD] rows (UNUSED) up to the embedding's 151,936."""
    from gguf import TokenType

    from paw_lite.convert.hf_bpe import BPEVocab
    from paw_lite.testing.qwen3 import ENDOFTEXT_ID, IM_END_ID, QWEN3_ADDED, qwen_vocab
    from paw_lite.testing.vocab import vocab_dir

    base, merges = qwen_vocab(vocab_dir())
    tokens = list(base) + [t for t, _ in QWEN3_ADDED]
    types = [int(TokenType.NORMAL)] * len(base) + [int(TokenType.CONTROL if s else TokenType.USER_DEFINED)
                                                   for _, s in QWEN3_ADDED]
    n_rows = qwen3_0_6b_config().n_vocab
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_rows)]
    types += [int(TokenType.UNUSED)] * (n_rows - len(types))
    return BPEVocab(tokens=tokens, token_types=types, merges=list(merges), bos_id=None, eos_id=IM_END_ID,
                    pad_id=ENDOFTEXT_ID, add_bos=False, chat_template=None)


def _write_base(path: Path, config) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

    from paw_lite.atomic import atomic_path
    from paw_lite.convert.gguf_stream import TensorPlan, write_streamed
    from paw_lite.convert.llama_quantize import llama_quantize
    from paw_lite.convert.qwen3 import _add_metadata
    from paw_lite.testing.qwen3 import ENDOFTEXT_ID, IM_END_ID

    vocab = _vocab()

    def plan(name: str, shape: tuple[int, ...], seed: int) -> TensorPlan:
        def rows(r0: int, r1: int) -> tuple[np.ndarray, str]:
            rng = np.random.default_rng([seed, r0])
            if len(shape) == 1:
                return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)), "F32"
            block = 0.02 * rng.standard_normal((r1 - r0, shape[1]), dtype=np.float32)
            if name == "token_embd.weight":  # tied head: both EOS score 0, far below the maximum of 152k random logits
                for eos in (IM_END_ID, ENDOFTEXT_ID):
                    if r0 <= eos < r1:
                        block[eos - r0] = 0.0
            return block, "F32"

        qtype = GGMLQuantizationType.F16 if len(shape) == 2 else GGMLQuantizationType.F32
        return TensorPlan(name, shape, qtype, rows)

    plans = [plan(name, shape, seed) for seed, (name, shape) in enumerate(config.tensor_shapes().items())]
    intermediate = path.with_name(path.stem + "-f16.gguf")
    with atomic_path(intermediate) as tmp:
        w = GGUFWriter(tmp, "qwen3")
        _add_metadata(w, config, vocab, "qwen3-0.6b-random", LlamaFileType.MOSTLY_F16)
        write_streamed(w, plans)
        w.close()
    try:
        llama_quantize(intermediate, path, "q6_k")
    finally:
        intermediate.unlink(missing_ok=True)


def _write_adapter(path: Path, config) -> None:
    from paw_lite.lora import write_adapter_gguf
    from paw_lite.testing.qwen3 import random_qwen3_lora

    write_adapter_gguf(path, random_qwen3_lora(config, RANK, seed=2, std=0.05), 16.0, "q4_0", arch="qwen3")


def _template(tok) -> tuple[str, list[int]]:
    """A Standard template (`families.standard_template`) whose prefix is PREFIX_TOKENS tokens."""
    from paw_lite.families import standard_template

    head = "Task: classify each log line as ALERT or QUIET."
    tail = "\n\nExamples:\nInput: disk usage at 99% on /var\nOutput: ALERT"
    words: list[str] = []
    i = 0
    while True:
        template = standard_template(head + "".join(words) + tail, "{INPUT_PLACEHOLDER}")
        prefix = template.split("{INPUT_PLACEHOLDER}")[0]
        n = len(tok.encode(prefix))
        if n == PREFIX_TOKENS:
            return template, tok.encode(prefix)
        if n > PREFIX_TOKENS:
            words.pop()
        else:
            words.append(" " + ib._WORDS[i % len(ib._WORDS)])
        i += 1


def _write_program(path: Path, adapter: Path, template: str) -> None:
    from paw_lite.families import STANDARD
    from paw_lite.program import Program

    meta = {"version": 4, "program_id": "0" * 20, "spec": "benchmark program (random weights)",
            "interpreter": STANDARD.interpreter, "runtime_id": STANDARD.runtime_id, "prefix_steps": None,
            "lora_rank": RANK, "lora_alpha": 16.0, "pseudo_program_strategy": "provided"}
    pseudo = template.split("\n\n[INPUT]")[0].removeprefix("<|im_start|>user\n")
    Program(meta=meta, template=template, adapter_gguf=adapter.read_bytes(), pseudo_program=pseudo).save(path)


# -- the measuring processes ------------------------------------------------------------------

class ProductFloor:
    """interpreter_bench.ProductFloor for Qwen3's matrices: the float32 products one call cannot do
    without (the prompt's rows through every layer's q/k/v, output, gate/up and down matrices, one
    head product per output token, every matrix once per decoded token), timed alone on the loaded
    weights; nothing else. What a float32 NumPy interpreter does not get below on this host.

    `step` is the products of any step the scheduler runs, so the same class times fn.map's own
    steps too (`StepLog.floor_s`). Its buffers hold n_prompt rows: the replay's largest step."""

    def __init__(self, weights, n_prompt: int):
        from paw_lite.products import SMALL_PRODUCT_ROWS, Head

        self.weights, self.n_prompt = weights, n_prompt
        layer = weights.layers[0]
        widest = max(layer.attn_qkv.shape[0], layer.ffn_gate_up.shape[0])
        self.d, self.n_ff = layer.ffn_down.shape[0], layer.ffn_down.shape[1]
        rng = np.random.default_rng(0)
        self.x_d = rng.standard_normal((n_prompt, self.d), dtype=np.float32)
        self.x_q = rng.standard_normal((n_prompt, layer.attn_output.shape[1]), dtype=np.float32)
        self.x_ff = rng.standard_normal((n_prompt, self.n_ff), dtype=np.float32)
        self.out = np.empty((n_prompt, widest), np.float32)
        self.scratch = np.empty(widest * min(n_prompt, SMALL_PRODUCT_ROWS), np.float32)
        self.head = Head(weights.head)
        self.prompt_s: list[float] = []
        self.token_s: list[float] = []

    def step(self, n: int, m: int) -> None:
        """The products of a step of n rows, m of them wanting logits: every row through the
        layers' q/k/v (the last layer's keys and values are stored for every row), the m rows
        through the rest of the last layer and the head (`qwen3_packed.Qwen3Packed.forward`)."""
        from paw_lite.products import project

        layers, out = self.weights.layers, self.out
        for i, layer in enumerate(layers):
            r = m if i == len(layers) - 1 else n
            project(self.x_d[:n], layer.attn_qkv, out[:n, :layer.attn_qkv.shape[0]], self.scratch)
            if r:
                project(self.x_q[:r], layer.attn_output, out[:r, :self.d], self.scratch)
                project(self.x_d[:r], layer.ffn_gate_up, out[:r, :layer.ffn_gate_up.shape[0]], self.scratch)
                project(self.x_ff[:r], layer.ffn_down, out[:r, :self.d], self.scratch)
        if m:
            self.head.greedy(self.x_d[:m])

    def sample(self) -> None:
        self.prompt_s.append(ib._median_time(lambda: self.step(self.n_prompt, 1), 1))
        self.token_s.append(ib._median_time(lambda: self.step(1, 1), 1))

    def result(self, n_out: int) -> dict:
        prompt, token = statistics.median(self.prompt_s), statistics.median(self.token_s)
        return {"one_call_floor_s": prompt + (n_out - 1) * token, "decode_floor_tok_s": 1.0 / token}


class StepLog:
    """The steps a Qwen3 fn.map evaluates, per worker thread, as (rows, rows wanting logits): a
    recorder around Qwen3Packed.forward while the block runs (a list append a step, nothing in
    the steps themselves). Qwen3 only: GPT-2's forward is another class."""

    def __enter__(self) -> "StepLog":
        import threading

        from paw_lite.qwen3_packed import Qwen3Packed

        self.by_thread: dict[int, list[tuple[int, int]]] = {}
        self._forward = forward = Qwen3Packed.forward

        def recorded(model, cache, step, tokens, wanted):
            self.by_thread.setdefault(threading.get_ident(), []).append((len(tokens), int(wanted.sum())))
            return forward(model, cache, step, tokens, wanted)

        Qwen3Packed.forward = recorded
        return self

    def __exit__(self, *exc) -> None:
        from paw_lite.qwen3_packed import Qwen3Packed

        Qwen3Packed.forward = self._forward

    def floor_s(self, weights) -> float:
        """Seconds the float32 products of the recorded steps take alone: each worker thread's
        steps replayed by a thread of its own, all at once, BLAS at one thread each when there
        are several (as fn.map runs them). What the map cannot get below whatever its attention,
        norms and Python cost, with the same steps: the ceiling of its throughput on this host."""
        import contextlib
        import threading

        from paw_lite import blas_threads

        steps = list(self.by_thread.values())
        if not steps:
            raise RuntimeError("no Qwen3 step was recorded: StepLog times a Qwen3 map's steps")
        floors = [ProductFloor(weights, max(n for n, _ in s)) for s in steps]
        start = threading.Barrier(len(steps) + 1)
        failures: list[BaseException] = []

        def replay(floor: ProductFloor, own: list[tuple[int, int]]) -> None:
            start.wait()
            try:
                for n, m in own:
                    floor.step(n, m)
            except BaseException as exc:  # re-raised below: a failed replay must not time as a fast one
                failures.append(exc)

        with blas_threads.single_threaded() if len(steps) > 1 else contextlib.nullcontext():
            seconds = ib.time_threads([threading.Thread(target=replay, args=pair) for pair in zip(floors, steps)],
                                      start)
        if failures:
            raise failures[0]
        return seconds


def paw_worker(w, inner: int, n_calls: int, batch_size: int, agree: bool) -> dict:
    return ib.paw_worker(w, inner, n_calls, batch_size, agree, ib.PawMeasures(
        ProductFloor, decode_tokens=DECODE_TOKENS, agree_inputs=AGREE_INPUTS, agree_tokens=AGREE_TOKENS,
        map_checked=AGREE_INPUTS, prefix_runs=lambda inner: max(1, inner // 3),
        long_runs=lambda inner: max(1, inner // 3), map_steps=StepLog))


class _Official(ib._Llama):
    """interpreter_bench's llama.cpp set-up, with the official runtime's call: `sample(temp=0)` then
    `eval([token])` per token, stopping at the file's EOS (<|im_end|>) or the limit."""

    def call(self, ids: list[int], max_tokens: int) -> list[int]:
        self.llm.n_tokens = len(self.prefix)
        self.llm.eval(ids[len(self.prefix):])
        out: list[int] = []
        for _ in range(max_tokens):
            token = self.llm.sample(temp=0)
            if token == self.llm.token_eos():
                break
            out.append(token)
            self.llm.eval([token])
        return out


def official_worker(w, inner: int, n_calls: int, batch_size: int, agree: bool) -> dict:
    res: dict = {}
    t = time.perf_counter()
    eng = _Official(w)
    eng.eval_prefix()
    res["cold_start_s"] = time.perf_counter() - t
    calls = w.calls

    def one_call(i=[0]):
        out = eng.call(calls[i[0] % len(calls)]["ids"], OUTPUT_TOKENS)
        assert len(out) == OUTPUT_TOKENS, out
        i[0] += 1

    res["one_call_s"] = ib._median_time(one_call, inner)
    res["peak_rss_one_program_mb"] = ib._peak_rss_mb()
    res["prefix_eval_s"] = ib._median_time(eng.eval_prefix, max(1, inner // 3))
    eng.eval_prefix()
    t_long = ib._median_time(lambda: eng.call(calls[0]["ids"], DECODE_TOKENS + 1), max(1, inner // 3))
    t_short = ib._median_time(lambda: eng.call(calls[0]["ids"], 1), inner)
    res["decode_tok_s"] = DECODE_TOKENS / (t_long - t_short)
    n_long = len(w.long_call["ids"]) - len(w.prefix_ids)
    res["prefill_tok_s"] = n_long / ib._median_time(lambda: eng.call(w.long_call["ids"], 1), max(1, inner // 3))
    t = time.perf_counter()
    outs = [eng.call(c["ids"], OUTPUT_TOKENS) for c in calls[:n_calls]]
    res["throughput_calls_s"] = n_calls / (time.perf_counter() - t)
    assert all(len(o) == OUTPUT_TOKENS for o in outs)
    res["peak_rss_run_mb"] = ib._peak_rss_mb()
    if agree:
        res["agree_ids"] = [eng.call(c["ids"], AGREE_TOKENS) for c in calls[:AGREE_INPUTS]]
    eng.close()
    return res


WORKERS = {"paw_lite": paw_worker, "official": official_worker}


# -- orchestration and report -----------------------------------------------------------------

ROWS = [(key, label.replace("llama.cpp calls", "official calls"), unit, lower, *rest)
        for key, label, unit, lower, *rest in ib.ROWS]
ROWS = [(k, f"decode, one sequence ({DECODE_TOKENS} tokens)", *rest) if k == "decode_tok_s" else (k, label, *rest)
        for k, label, *rest in ROWS]
ROWS.append(("throughput_floor_calls_s", "throughput, fn.map's own steps' float32 products alone (its ceiling)",
             "calls/s", False, "throughput_calls_s"))


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
            samples[engine].append(ib._run_worker(engine, cache, opts, agree=rep == 0, script=Path(__file__).resolve()))
            (cache / "samples.json").write_text(json.dumps(samples))  # kept should the report fail
    rows = []
    for key, label, unit, lower, *against in ROWS:
        keys = {"paw_lite": key, "official": against[0] if against else key}
        vals = {e: [s[keys[e]] for s in samples[e] if keys[e] in s] for e in ENGINES}
        med = {e: (statistics.median(v) if v else None) for e, v in vals.items()}
        p, o = med["paw_lite"], med["official"]
        rows.append({"key": key, "label": label, "unit": unit, "lower_is_better": lower, "paw_lite": p, "official": o,
                     "ratio": (p / o) if p is not None and o else None, "samples": vals})

    agreement = ib._agreement(samples["paw_lite"][0]["agree_ids"], samples["official"][0]["agree_ids"])
    agreement["tokens_each"] = AGREE_TOKENS
    equal = samples["paw_lite"][0]["map_equals_calls"]
    return {
        "rows": rows,
        "agreement": agreement,
        "map_equals_one_by_one": f"{sum(equal)}/{len(equal)}",
        "conditions": ib.conditions(repeats, inner, calls, batch_size, load_before, t0),
    }


def format_table(result: dict) -> str:
    lines = ["| measure | paw_lite | official way | paw_lite / official |", "| --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['label']} | {ib._fmt(r['paw_lite'], r['unit'])} | {ib._fmt(r['official'], r['unit'])} | {ratio} |")
    a, c = result["agreement"], result["conditions"]
    lines += ["", f"Greedy agreement with the official way ({a['inputs']} inputs x {a['tokens_each']} tokens): "
                  f"{a['identical_sequences']}/{a['inputs']} identical sequences, {a['matching_tokens']}/{a['total_tokens']} "
                  f"tokens equal position by position.",
              f"fn.map equals one call at a time on the benchmark model: {result['map_equals_one_by_one']} inputs.",
              f"Medians of {c['repeats']} fresh processes per engine (alternating) x {c['inner']} timed runs; throughput over "
              f"{c['calls']} calls (fn.map batch_size {c['batch_size']}); llama.cpp n_threads {c['llama_n_threads']}; "
              f"{c['cpus']} CPUs, load average {c['loadavg_before'][0]:.2f} before, {c['loadavg_after'][0]:.2f} after; "
              f"numpy {c['numpy']}, llama-cpp-python {c['llama_cpp_python']}."]
    rows = {r["key"]: r for r in result["rows"]}
    lines += ib.target_lines(TARGETS, result["rows"])
    floor = rows["one_call_floor_s"]
    if floor["paw_lite"] is not None and rows["one_call_s"]["official"]:
        lines.append(f"one call: {rows['one_call_s']['ratio']:.2f}x the official way's; paw_lite's float32 products "
                     f"alone take {floor['ratio']:.2f}x the official way's whole call (the floor of a float32 NumPy "
                     f"interpreter on this host)")
    return "\n".join(lines)


def main_from_args(args: argparse.Namespace) -> dict:
    args.cache = args.cache or DEFAULT_CACHE
    return ib.main_from_args(args, run, OUTPUT_NAME)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        ib._worker_main(sys.argv[1:], WORKERS)
    else:
        args = ib.build_parser(__doc__).parse_args()
        result = main_from_args(args)
        print(json.dumps(result, indent=2) if args.json else format_table(result))
