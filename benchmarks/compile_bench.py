"""`paw-lite compile` at full size on this machine: wall time per phase and peak RSS.

    python benchmarks/compile_bench.py [--json] [--repeats N] [--pseudo-tokens 250] [--threads N]

The models are random (speed does not depend on weight values) but shaped and typed as the
defaults say: the trained compiler is a Qwen3-4B layout (36 layers, 2560 wide, 32/8 heads, head_dim
128, FFN 9728, tied embedding of 151,733 rows, the real Qwen tokenizer + 64 prefix tokens) as Q8_0;
the pseudo compiler is the same layout as Q4_K_M (llama.cpp's own quantizer, requantizing the Q8_0
file; it picks the same per-tensor types as from bf16); the interpreter is a full-size GPT-2 Q8_0 with
2048 positions (the interpreter benchmark's file); the mapper has the published shapes (fp32).
They are written once into benchmarks/.cache/compile, tensor by tensor (never the whole model in
memory).

Each repeat runs `paw-lite compile --json` in a fresh process (the first one without the pseudo
compiler's cached prompt state, the next ones with it) with a ~250-token pseudo-program
(`--max-new-tokens`; the count generated is reported: a random model rarely stops early) and
reports the process's wall time, each phase's time and peak RSS (VmHWM, reset at each phase start,
so mapped weights count). Targets: <= 120 s, <= 5 GB."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "compile"
FORMAT = 1  # bump to regenerate the cached files
SPEC = ("Classify a server log line as ALERT when it reports a failure, an error, a full disk or a timeout, "
        "and QUIET for routine events such as logins and scheduled jobs. Answer with the one word.")

QWEN3_4B = dict(n_ctx=262144, n_embd=2560, n_ff=9728, n_layer=36, n_head=32, n_head_kv=8, head_dim=128,
                eps=1e-6, rope_theta=5_000_000.0, tied=True)
N_ROWS = 151733  # the trained compiler's embedding rows (151,669 Qwen tokens + 64 prefix tokens)
MAPPER = dict(rank=64, bases=64, alpha=16.0, prefix_steps=64)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- generating the files ----------------------------------------------------------------------------


def _tokenizer_folder(folder: Path) -> Path:
    """An HF tokenizer folder with the real Qwen vocabulary, Qwen3's added tokens, the 64 prefix tokens
    and a Qwen chat template (the test fixtures' tokenizer)."""
    from paw_lite.testing.qwen3 import save_qwen_tokenizer
    from paw_lite.testing.vocab import vocab_dir

    folder.mkdir(parents=True, exist_ok=True)
    save_qwen_tokenizer(folder, vocab_dir(), template_in_jinja_file=False)
    return folder


def _write_compiler(path: Path, tok_dir: Path) -> None:
    """Random Qwen3-4B weights as Q8_0, written tensor by tensor from one reused random buffer."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

    from paw_lite.atomic import atomic_path
    from paw_lite.convert.gguf_stream import TensorPlan, write_streamed
    from paw_lite.convert.hf_bpe import read_bpe_vocab
    from paw_lite.convert.qwen3 import ARCH, Qwen3Config, _add_metadata

    cfg = Qwen3Config(n_vocab=N_ROWS, **QWEN3_4B)
    vocab = read_bpe_vocab(tok_dir, N_ROWS)
    noise = (0.02 * np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32))  # 64 MiB, reused

    def plan(name: str, shape: tuple[int, ...]) -> TensorPlan:
        cols = shape[-1]

        def read_rows(r0: int, r1: int):
            if len(shape) == 1:  # norms: ones keep 36 random layers finite
                return np.ones(shape, np.float32), "F32"
            n = (r1 - r0) * cols
            start = (r0 * cols * 7919) % (noise.size - n + 1)
            return noise[start:start + n].reshape(r1 - r0, cols), "F32"

        return TensorPlan(name, shape, GGMLQuantizationType.Q8_0 if len(shape) == 2 else GGMLQuantizationType.F32, read_rows)

    plans = [plan(name, shape) for name, shape in cfg.tensor_shapes().items()]
    with atomic_path(path) as tmp:
        w = GGUFWriter(tmp, ARCH)
        _add_metadata(w, cfg, vocab, "random-qwen3-4b", LlamaFileType.MOSTLY_Q8_0)
        done = 0

        def on_tensor(name: str) -> None:
            nonlocal done
            done += 1
            if done % 40 == 0:
                log(f"  {done}/{len(plans)} tensors")

        write_streamed(w, plans, on_tensor)
        w.close()


def _requantize(src: Path, out: Path, ftype: str) -> None:
    """llama.cpp's quantizer (as `paw-lite convert --type q4_k_m` runs it), allowed to requantize Q8_0."""
    import logging

    import llama_cpp
    from gguf import LlamaFileType

    from paw_lite.atomic import atomic_path

    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)  # one log line per tensor otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = os.cpu_count() or 1
    params.ftype = int(getattr(LlamaFileType, f"MOSTLY_{ftype.upper()}"))
    params.allow_requantize = True
    with atomic_path(out) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed with rc {rc}")


def _write_mapper(path: Path, meta_path: Path, interpreter) -> None:
    from safetensors.numpy import save_file

    from paw_lite.gpt2_layout import LORA_MODULES

    rng = np.random.default_rng(1)
    h, r, n = QWEN3_4B["n_embd"], MAPPER["rank"], MAPPER["bases"]
    n_coeff = interpreter.n_layer * len(LORA_MODULES) * n * 2
    state = {"trunk.0.weight": rng.standard_normal((h, h), dtype=np.float32) / np.sqrt(h),
             "trunk.0.bias": np.zeros(h, np.float32),
             "coeff_head.weight": rng.standard_normal((n_coeff, h), dtype=np.float32) / np.sqrt(h),
             "coeff_head.bias": np.zeros(n_coeff, np.float32)}
    for gguf_name, (_, suffix) in LORA_MODULES.items():
        d_in, d_out = interpreter.module_dims(gguf_name)
        state[f"A_bases_{suffix}"] = rng.standard_normal((n, r, d_in), dtype=np.float32) / np.sqrt(d_in)
        state[f"B_bases_{suffix}"] = 0.01 * rng.standard_normal((n, d_out, r), dtype=np.float32)
    save_file({k: v.astype(np.float32) for k, v in state.items()}, str(path))
    meta = {"interpreter_model": "gpt2", "lora_rank": r, "lora_alpha": MAPPER["alpha"], "lora_num_bases": n,
            "prefix_steps": MAPPER["prefix_steps"], "compiler_prompt_style": "minimal", "compiler_snapshot": "random-bench"}
    meta_path.write_text(json.dumps(meta, indent=2))


def ensure_models(cache: Path = CACHE) -> Path:
    """A models directory with the five files under their default names; built once."""
    from interpreter_bench import ensure_workload  # the sibling script: this one runs from benchmarks/

    from paw_lite.base_model import read_header
    from paw_lite.compiler.config import DEFAULT_FILES

    models = cache / "models"
    stamp = cache / "format.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("format") == FORMAT:
        return models
    models.mkdir(parents=True, exist_ok=True)
    files = {k: models / v for k, v in DEFAULT_FILES.items()}
    t0 = time.perf_counter()
    interpreter = ensure_workload(cache / "interpreter", 0, log=log).base  # the interpreter benchmark's GPT-2 file
    if files["interpreter"].is_symlink() or files["interpreter"].exists():
        files["interpreter"].unlink()
    files["interpreter"].symlink_to(interpreter)
    if not files["compiler"].exists():  # each file is written once (atomically): an interrupted build resumes
        log(f"writing {files['compiler'].name} (random Qwen3-4B layout, Q8_0, ~4.3 GB) ...")
        _write_compiler(files["compiler"], _tokenizer_folder(cache / "qwen-tokenizer"))
    if not files["pseudo_compiler"].exists():
        log(f"writing {files['pseudo_compiler'].name} (llama.cpp Q4_K_M) ...")
        _requantize(files["compiler"], files["pseudo_compiler"], "q4_k_m")
    log(f"writing {files['mapper'].name} (published shapes, fp32) ...")
    _write_mapper(files["mapper"], files["compiler_meta"], read_header(interpreter)[0])
    stamp.write_text(json.dumps({"format": FORMAT, "seconds_to_build": round(time.perf_counter() - t0, 1)}))
    return models


# -- measuring ---------------------------------------------------------------------------------------


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _machine_busy_s() -> float:
    """CPU seconds all processes have used since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:8]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def run_once(models: Path, out: Path, pseudo_tokens: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "paw_lite", "compile", SPEC, "-o", str(out), "--models", str(models),
           "--max-new-tokens", str(pseudo_tokens), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    # A private user cache: the first run builds the pseudo compiler's prompt state, later runs reuse it.
    env = dict(os.environ, PAW_LITE_CACHE=str(out.parent / "user-cache"))
    cpu0, busy0 = _children_cpu_s(), _machine_busy_s()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"compile failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout)
    # The machine is shared: CPU time used by other processes meanwhile says how much to trust the wall time.
    others = max(0.0, _machine_busy_s() - busy0 - cpu)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "other_processes_cpu_s": round(others, 1),
            "phases_s": result["seconds"], "peak_rss_mb": result["peak_rss_mb"],
            "phases": result["phases"], "pseudo_attempts": result["pseudo_attempts"],
            "pseudo_generated_tokens": result["pseudo_generated_tokens"],
            "pseudo_program_tokens_gpt2": result["pseudo_program_tokens"], "encoder_tokens": result["encoder_tokens"],
            "adapter_bytes": result["adapter_bytes"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--pseudo-tokens", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=CACHE, help=f"where the generated models live (default {CACHE})")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    models = ensure_models(args.cache)
    shutil.rmtree(args.cache / "user-cache", ignore_errors=True)
    runs = []
    for i in range(args.repeats):
        log(f"compile {i + 1}/{args.repeats} ...")
        runs.append(run_once(models, args.cache / "bench.paw", args.pseudo_tokens, args.threads))
    report = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
              "pseudo_tokens": args.pseudo_tokens, "runs": runs}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for i, run in enumerate(runs, 1):
            print(f"run {i}: {run['wall_s']} s wall (process), {run['phases_s']} s in the phases, {run['cpu_s']} CPU s "
                  f"(other processes meanwhile: {run['other_processes_cpu_s']} CPU s), peak RSS {run['peak_rss_mb']} MB, "
                  f"pseudo-program {run['pseudo_generated_tokens']} tokens generated ({run['pseudo_program_tokens_gpt2']} GPT-2 tokens), "
                  f"encoder {run['encoder_tokens']} tokens "
                  f"({run['pseudo_attempts']} attempt(s))")
            for p in run["phases"]:
                print(f"  {p['name']:<15} {p['seconds']:7.1f} s   peak RSS {p['peak_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
