"""Shared pieces of the Standard-program tests: a Standard .paw bundle as the official compiler
writes one, on any adapter tensors; a tiny Standard interpreter and a models directory with the
Standard compiler files on tiny models (test_standard_programs.py, test_compile_standard.py,
test_serve_standard.py, test_serve_paw_api.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from compiler_fixtures import TINY_BASES, TINY_RANK, save_mapper, write_compiler_meta
from oracles import oracle
from paw_lite.compiler.config import default_files
from paw_lite.families import STANDARD, standard_template
from paw_lite.lora import adapter_gguf_bytes
from paw_lite.program import PLACEHOLDER, Program

PSEUDO = ("Task: classify the sentiment of a product review as POSITIVE or NEGATIVE.\n\n"
          "Examples:\nInput: works great, five stars\nOutput: POSITIVE\nInput: broke after a day\nOutput: NEGATIVE")


def make_standard_program(path: Path, tensors: dict[str, np.ndarray], alpha: float = 16.0, tensor_type: str = "q4_0",
                          pseudo: str = PSEUDO, runtime_id: str = STANDARD.runtime_id) -> Path:
    """A Standard .paw bundle as the official compiler writes one: meta.json with the Standard
    interpreter and runtime, prefix_steps null, and the Standard template."""
    rank = next(iter(tensors.values())).shape[0]
    meta = {"version": 4, "program_id": "1" * 20, "spec": "classify review sentiment", "interpreter": STANDARD.interpreter,
            "runtime_id": runtime_id, "prefix_steps": None, "lora_rank": rank, "lora_alpha": alpha,
            "pseudo_program_strategy": "provided"}
    return Program(meta=meta, template=standard_template(pseudo, PLACEHOLDER),
                   adapter_gguf=adapter_gguf_bytes(tensors, alpha, tensor_type, arch=STANDARD.arch),
                   pseudo_program=pseudo).save(path)


N_CTX = 384  # the tiny interpreter's context: 128 positions for a pseudo-program under the 256 reserved
N_INTERP_LAYERS = 3  # the tiny compiler has 4: t(l) = int((l+1)*4/3) - 1 = 0, 1, 3 (a ratio other than 36/28)
STANDARD_META = {"interpreter_model": "Qwen/Qwen3-0.6B", "compiler_snapshot": "paw-4b-qwen3-0.6b-tiny-test"}


def module_dims(hf_config) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each module from a transformers Qwen3Config (the reimplementation's profiles.py)."""
    h, q, kv, ff = (hf_config.hidden_size, hf_config.num_attention_heads * hf_config.head_dim,
                    hf_config.num_key_value_heads * hf_config.head_dim, hf_config.intermediate_size)
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, ff), "up_proj": (h, ff), "down_proj": (ff, h)}


def random_standard_mapper(hidden: int, n_layer: int, dims: dict[str, tuple[int, int]], rank: int, n_bases: int,
                           seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_coeff = n_layer * len(dims) * n_bases * 2
    state = {"trunk.0.weight": rng.standard_normal((hidden, hidden)) / np.sqrt(hidden),
             "trunk.0.bias": rng.standard_normal(hidden) * 0.1,
             "coeff_head.weight": rng.standard_normal((n_coeff, hidden)) / np.sqrt(hidden),
             "coeff_head.bias": rng.standard_normal(n_coeff) * 0.1}
    for suffix, (d_in, d_out) in dims.items():
        state[f"A_bases_{suffix}"] = rng.standard_normal((n_bases, rank, d_in)) / np.sqrt(d_in)
        state[f"B_bases_{suffix}"] = rng.standard_normal((n_bases, d_out, rank)) * 0.05
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def tiny_standard_interpreter(tmp_path_factory, vocab_dir: Path) -> tuple[Path, Path]:
    """A tiny random Qwen3 interpreter (3 layers, the real Qwen vocabulary) as HF folder and F32 GGUF."""
    from paw_lite.convert.qwen3 import convert_qwen3
    from paw_lite.testing.qwen3 import make_tiny_qwen3

    root = tmp_path_factory.mktemp("std-interp")
    hf = make_tiny_qwen3(root / "hf", vocab_dir, n_layer=N_INTERP_LAYERS, seed=5, dtype="float32")
    # A short context: a random model rarely writes EOS, and `--run` / `--test` generate to the end
    config = json.loads((hf / "config.json").read_text())
    config["max_position_embeddings"] = N_CTX
    (hf / "config.json").write_text(json.dumps(config))
    return hf, convert_qwen3(hf, root / "tiny-qwen3-interp-f32.gguf", "f32")


def standard_models_dir(d: Path, compiler: tuple[Path, Path], interpreter: tuple[Path, Path]) -> dict[str, np.ndarray]:
    """Fill `d` with the Standard compiler's files under their default names: a random mapper for
    `interpreter`, a meta.json naming Qwen/Qwen3-0.6B, the tiny Qwen3 `compiler` (HF folder, GGUF) as
    compiler and pseudo compiler, and the interpreter GGUF. Returns the mapper's weights."""
    names = default_files("standard")
    dims = module_dims(oracle("transformers").AutoConfig.from_pretrained(interpreter[0]))
    state = random_standard_mapper(256, N_INTERP_LAYERS, dims, TINY_RANK, TINY_BASES, seed=11)
    save_mapper(d / names["mapper"], state)
    write_compiler_meta(d / names["compiler_meta"], **STANDARD_META)
    for key, src in (("compiler", compiler[1]), ("pseudo_compiler", compiler[1]), ("interpreter", interpreter[1])):
        if not (key == "pseudo_compiler" and (d / names[key]).exists()):  # both families share the pseudo compiler
            (d / names[key]).symlink_to(src)
    return state
