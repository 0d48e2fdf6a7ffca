"""Tiny compiler models for the compiler tests: a random Qwen3 compiler (HF folder + GGUF), a random
mapper with the published key names, a compiler meta.json, and the mapper of the public reimplementation avra-m3/program-as-weights-server, checked against the published lora_mapper.pt shapes written
in PyTorch as the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from oracles import oracle

from paw_lite.gpt2_layout import LORA_MODULES, GPT2Config

TINY_RANK = 32  # Q4_0 blocks are 32 wide: lora_b rows have length r
TINY_BASES = 8
PREFIX_STEPS = 64
ALPHA = 16.0
# The mapper's module axis is in sorted key-suffix order (the public reimplementation avra-m3/program-as-weights-server, checked against the published lora_mapper.pt shapes), written out independently here.
SORTED_MODULES = sorted(((suffix, gguf_name) for gguf_name, (_, suffix) in LORA_MODULES.items()))


def tiny_qwen(tmp_path_factory, vocab_dir: Path) -> tuple[Path, Path]:
    """(HF folder, F32 GGUF) of a 4-layer random Qwen3 with the real Qwen tokenizer, the 64 prefix
    tokens and a chat template; built once per test session (shared through the session's base temp)."""
    from paw_lite.convert.qwen3 import convert_qwen3
    from paw_lite.testing.qwen3 import make_tiny_qwen3

    root = tmp_path_factory.getbasetemp() / "compiler_tiny_qwen"
    folder, gguf = root / "hf", root / "tiny-qwen3-f32.gguf"
    if not gguf.exists():
        make_tiny_qwen3(folder, vocab_dir, n_layer=4, dtype="float32")
        convert_qwen3(folder, gguf, "f32")
    return folder, gguf


def random_mapper_state(hidden: int, interpreter: GPT2Config, rank: int = TINY_RANK, n_bases: int = TINY_BASES,
                        trunk: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random fp32 weights with the published key names (the public reimplementation avra-m3/program-as-weights-server, checked against the published lora_mapper.pt shapes) for these sizes."""
    rng = np.random.default_rng(seed)
    trunk = trunk or hidden
    n_coeff = interpreter.n_layer * len(LORA_MODULES) * n_bases * 2
    state = {
        "trunk.0.weight": rng.standard_normal((trunk, hidden)) / np.sqrt(hidden),
        "trunk.0.bias": rng.standard_normal(trunk) * 0.1,
        "coeff_head.weight": rng.standard_normal((n_coeff, trunk)) / np.sqrt(trunk),
        "coeff_head.bias": rng.standard_normal(n_coeff) * 0.1,
    }
    for gguf_name, (_, suffix) in LORA_MODULES.items():
        d_in, d_out = interpreter.module_dims(gguf_name)
        state[f"A_bases_{suffix}"] = rng.standard_normal((n_bases, rank, d_in)) / np.sqrt(d_in)
        state[f"B_bases_{suffix}"] = rng.standard_normal((n_bases, d_out, rank)) * 0.05
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def save_mapper(path: Path, state: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    save_file(state, str(path))
    return path


def write_compiler_meta(path: Path, *, rank: int = TINY_RANK, alpha: float = ALPHA, n_bases: int = TINY_BASES,
                        prefix_steps: int = PREFIX_STEPS, **extra) -> Path:
    meta = {"interpreter_model": "gpt2", "lora_rank": rank, "lora_alpha": alpha, "lora_num_bases": n_bases,
            "prefix_steps": prefix_steps, "compiler_prompt_style": "minimal", "compiler_snapshot": "tiny-test", **extra}
    path.write_text(json.dumps(meta), encoding="utf-8")
    return path


def torch_mapper(state: dict[str, np.ndarray], hidden_states: list, n_layer: int, n_bases: int) -> dict[str, np.ndarray]:
    """the public reimplementation avra-m3/program-as-weights-server, checked against the published lora_mapper.pt shapes in PyTorch (fp32): the oracle for the NumPy mapper. hidden_states: a list of
    n_layer tensors (positions, hidden)."""
    torch = oracle("torch")
    F = oracle("torch.nn.functional")

    sd = {k: torch.from_numpy(v) for k, v in state.items()}
    h = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in hidden_states]).mean(dim=0).mean(dim=0)
    z = F.gelu(F.linear(h, sd["trunk.0.weight"], sd["trunk.0.bias"]))
    c = F.linear(z, sd["coeff_head.weight"], sd["coeff_head.bias"]).view(n_layer, len(SORTED_MODULES), n_bases, 2)
    out = {}
    for layer in range(n_layer):
        for m, (suffix, gguf_name) in enumerate(SORTED_MODULES):
            a = torch.einsum("n,nrd->rd", c[layer, m, :, 0], sd[f"A_bases_{suffix}"])
            b = torch.einsum("n,nor->or", c[layer, m, :, 1], sd[f"B_bases_{suffix}"])
            out[f"blk.{layer}.{gguf_name}.weight.lora_a"] = a.numpy()
            out[f"blk.{layer}.{gguf_name}.weight.lora_b"] = b.numpy()
    return out


def max_rel(got: np.ndarray, want: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
