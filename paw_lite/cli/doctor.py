"""`paw-lite doctor`: check an installation end to end, offline, and say what to fix.

1. imports: the run dependencies, then the optional compile (llama-cpp-python, jinja2) and pull
   (huggingface_hub) extras;
2. llama.cpp: a tiny random GPT-2 written as Q8_0 by paw_lite itself is run by llama.cpp in a child
   process (a native build made for another CPU dies there with SIGSEGV/SIGILL instead of taking
   doctor down; on AMX CPUs the default -march=native build crashes exactly on Q8_0), and its logits
   are compared with paw_lite's NumPy interpreter on the same file;
3. the models directory: every file present is hashed and checked (`models verify`);
4. the cache directory is writable."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import paths
from ..errors import COMPILE_INSTALL, LLAMA_REINSTALL, PawError, install_hint
from . import emit

_REQUIRED = ("numpy", "gguf", "tokenizers", "safetensors", "tqdm")
_OPTIONAL = {"llama_cpp": "compile", "jinja2": "compile", "huggingface_hub": "pull"}
# For a llama-cpp-python that is installed but crashes or computes wrong here; a missing one only
# needs installing (COMPILE_INSTALL).
_LLAMA_FIX = f"reinstall llama-cpp-python built for this CPU: {LLAMA_REINSTALL}"
# Logits of the doctor's model through llama.cpp vs NumPy, both from the same Q8_0 file: llama.cpp
# also rounds activations to 8 bits in its Q8_0 matmuls and uses an fp16 GELU table. Measured: max
# abs diff 0.047 (mean 0.009) on logits of std 0.8; a miscompiled build is off by about the logits'
# own scale, or crashes.
_LOGIT_TOLERANCE = 0.15
_CHILD = """
import json, sys
import numpy as np
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, n_threads=1, logits_all=True, verbose=False)
ids = json.loads(sys.argv[2])
llm.eval(ids)
print(json.dumps(np.asarray(llm.scores[:len(ids)], dtype=np.float64).tolist()))
"""
IDS = [72, 101, 108, 108, 111, 32, 80, 65, 87, 33, 256, 10]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check the installation (imports, llama.cpp on this CPU, models, cache)")
    p.add_argument("--models", help="models directory (default $PAW_LITE_MODELS or the user cache)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _check(name: str, status: str, detail: str, fix: str = "") -> dict[str, str]:
    return {"check": name, "status": status, "detail": detail, "fix": fix}


def _distribution_version(module: str) -> str:
    """The installed version of a module without __version__ (gguf): its distribution's metadata."""
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "version unknown"


def check_imports() -> list[dict[str, str]]:
    out = []
    for module in _REQUIRED:
        try:
            mod = importlib.import_module(module)
            out.append(_check(f"import {module}", "ok", getattr(mod, "__version__", None) or _distribution_version(module)))
        except ImportError as exc:
            out.append(_check(f"import {module}", "fail", str(exc), "pip install -e . (paw-lite's own dependencies)"))
    for module, extra in _OPTIONAL.items():
        try:
            # llama_cpp is imported in a child below: a bad native build must not crash doctor itself
            spec = importlib.util.find_spec(module) if module == "llama_cpp" else importlib.import_module(module)
            if spec is None:
                raise ImportError(f"No module named {module!r}")
            out.append(_check(f"import {module}", "ok", f"for `{extra}`"))
        except ImportError as exc:
            out.append(_check(f"import {module}", "warn", f"{exc}: needed by `paw-lite {extra}` only", install_hint(extra)))
    return out


def write_doctor_model(path: Path) -> Path:
    """A tiny random GPT-2 (2 layers, width 64, a byte vocabulary and two merges) as Q8_0 GGUF."""
    from ..convert.gpt2 import write_gpt2_gguf
    from ..gpt2_layout import GPT2Config
    from ..tokenizer import _bytes_to_unicode

    tokens = [_bytes_to_unicode()[b] for b in range(256)] + ["<|endoftext|>", "Ġt", "he"]  # llama.cpp wants merges
    cfg = GPT2Config(n_vocab=len(tokens), n_ctx=64, n_embd=64, n_head=2, n_layer=2, n_ff=256, eps=1e-5)
    rng = np.random.default_rng(0)
    tensors = []
    for name, shape in cfg.tensor_shapes().items():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        tensors.append((name, (base + rng.standard_normal(shape) * 0.1).astype(np.float32)))
    return write_gpt2_gguf(path, cfg, tensors, tokens, ["Ġ t", "h e"], [256], 256, name="paw-lite-doctor")


def check_llama(tmp: Path) -> dict[str, str]:
    name = "llama.cpp runs a Q8_0 model"
    if importlib.util.find_spec("llama_cpp") is None:
        return _check(name, "warn", "llama-cpp-python is not installed: `paw-lite compile` is unavailable", COMPILE_INSTALL)
    model = write_doctor_model(tmp / "doctor-q8_0.gguf")
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, str(model), json.dumps(IDS)], capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired:
        return _check(name, "fail", "llama.cpp did not finish a 12-token evaluation in 120 s", _LLAMA_FIX)
    if r.returncode != 0:
        how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
        tail = (r.stderr.strip().splitlines() or [""])[-1][:200]
        return _check(name, "fail", f"llama.cpp crashed ({how}) on a Q8_0 model: {tail}", _LLAMA_FIX)
    got = np.array(json.loads(r.stdout))
    want = _numpy_logits(model)
    diff = float(np.abs(got - want).max())
    if not diff <= _LOGIT_TOLERANCE:
        return _check(name, "fail", f"llama.cpp logits differ from paw_lite's NumPy interpreter by {diff:.3g} "
                                    f"(> {_LOGIT_TOLERANCE}): a miscompiled build", _LLAMA_FIX)
    return _check(name, "ok", f"logits match the NumPy interpreter (max abs diff {diff:.2g})")


def _numpy_logits(model: Path) -> np.ndarray:
    from ..base_model import BaseModel
    from ..gpt2 import KVCache, forward

    base = BaseModel.load(model)
    return forward(IDS, base.weights, base.config, KVCache(base.config), 0, all_logits=True)


def check_models(directory: Path) -> list[dict[str, str]]:
    from ..models_dir.verify import NOT_A_FOLDER, NOT_A_FOLDER_FIX, survey

    if directory.exists() and not directory.is_dir():
        return [_check("models directory", "fail", f"{directory}: {NOT_A_FOLDER}", NOT_A_FOLDER_FIX)]
    if not directory.is_dir():
        return [_check("models directory", "warn", f"{directory} does not exist",
                       "`paw-lite models pull`, or `paw-lite models import DIR` without a network")]
    out = []
    for s in survey(directory, verify=True):
        if s.status == "missing":
            whose = "both families" if s.family == "both" else f"{s.family} programs"
            pull = "paw-lite models pull" + (" --family standard" if s.family == "standard" else "")
            out.append(_check(f"model {s.name}", "warn", f"missing ({s.role} of {whose}: {', '.join(s.serves)})",
                              f"`{pull}`, or `paw-lite models import DIR` without a network"))
        elif s.status == "bad":
            out.append(_check(f"model {s.name}", "fail", s.detail, "`paw-lite models pull` or `paw-lite models import DIR` again"))
        else:
            out.append(_check(f"model {s.name}", "ok", s.detail))
    return out


def check_writable(name: str, directory: Path, fix: str) -> dict[str, str]:
    if directory.exists() and not directory.is_dir():
        return _check(name, "fail", f"{directory} is a file, not a folder", fix)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-") as f:
            f.write(b"ok")
            f.flush()
        return _check(name, "ok", str(directory))
    except OSError as exc:
        return _check(name, "fail", f"{directory}: {exc.strerror or exc}", fix)


def check_map_workers() -> dict[str, str]:
    from .. import blas_threads

    ctl = blas_threads.controller()
    if ctl is None:
        return _check("fn.map workers", "warn", "NumPy's BLAS is not an OpenBLAS paw_lite can control: one worker",
                      "install NumPy from PyPI wheels (they bundle OpenBLAS) for one fn.map worker per core")
    return _check("fn.map workers", "ok", f"{blas_threads.map_workers()} (OpenBLAS {ctl.library})")


def run(args: argparse.Namespace) -> int:
    from ..models_dir.manifest import models_directory

    checks = check_imports()
    checks.append(check_map_workers())
    cache = paths.cache_dir()
    checks.append(check_writable("cache directory writable", cache, "set PAW_LITE_CACHE to a writable folder"))
    try:
        with tempfile.TemporaryDirectory(prefix="paw-lite-doctor-") as tmp:
            checks.append(check_llama(Path(tmp)))
    except (PawError, OSError) as exc:  # writing or reading back the test model in TMPDIR: not llama.cpp's build
        checks.append(_check("llama.cpp runs a Q8_0 model", "fail", str(exc),
                             "set TMPDIR to a writable folder with a few MB free"))
    try:
        checks += check_models(models_directory(args.models))
    except PawError as exc:  # an unreadable models directory is one failed check, not the end of the report
        checks.append(_check("models directory", "fail", str(exc),
                             "`paw-lite models import DIR` or `paw-lite models pull` again, or --models another folder"))
    failed = [c for c in checks if c["status"] == "fail"]
    lines = []
    for c in checks:
        lines.append(f"{c['status']:<5} {c['check']}: {c['detail']}")
        if c["fix"] and c["status"] != "ok":
            lines.append(f"      fix: {c['fix']}")
    lines.append(f"{len(failed)} problem(s)" if failed else "all checks passed" +
                 (" (with warnings)" if any(c["status"] == "warn" for c in checks) else ""))
    emit(args, {"ok": not failed, "checks": checks, "python": sys.version.split()[0], "platform": sys.platform,
                "cpu_count": os.cpu_count()}, "\n".join(lines))
    return 1 if failed else 0
