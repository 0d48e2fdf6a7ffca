"""GPT-2's weights in the one form both forward passes run on (`gpt2.py`, the reference, and
`gpt2_packed.py`, the runtime's): matrices in the GGUF Linear layout (d_out, d_in), float32,
C-contiguous, with a program's LoRA merged in by `merge_lora`, the one LoRA merge paw_lite has."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import IncompatibleModelError
from .gpt2_layout import LORA_MODULES, GPT2Config


@dataclass(frozen=True)
class Layer:
    """One block. A Linear layer is `x @ w.T + b` for rows x."""

    attn_norm_w: np.ndarray
    attn_norm_b: np.ndarray
    attn_qkv: np.ndarray  # (3d, d)
    attn_qkv_b: np.ndarray
    attn_output: np.ndarray  # (d, d)
    attn_output_b: np.ndarray
    ffn_norm_w: np.ndarray
    ffn_norm_b: np.ndarray
    ffn_up: np.ndarray  # (n_ff, d)
    ffn_up_b: np.ndarray
    ffn_down: np.ndarray  # (d, n_ff)
    ffn_down_b: np.ndarray


@dataclass(frozen=True)
class Weights:
    # (n_vocab, d): the logits of hidden rows h are h @ head.T (the packed forward reads it in
    # row blocks, in stored order).
    head: np.ndarray
    token_embd: np.ndarray | None  # (n_vocab, d), only when the head is not tied to the embedding
    position_embd: np.ndarray  # (n_ctx, d)
    output_norm_w: np.ndarray
    output_norm_b: np.ndarray
    layers: tuple[Layer, ...]

    @classmethod
    def from_gguf_names(cls, weights: Mapping[str, np.ndarray], config: GPT2Config,
                        lora: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, lora_scale: float = 1.0,
                        consume: bool = False) -> "Weights":
        """GGUF-named Linear-layout tensors (as `BaseModel.weights` holds them) with the LoRA pairs
        {"blk.{i}.{module}": (A (r, d_in), B (d_out, r))} merged: W + scale * B @ A.
        With consume, entries are popped from `weights` (a dict) and merged in their own memory, so
        the float32 model is never held twice; without it, matrices no LoRA targets are shared."""
        get = weights.pop if consume else weights.__getitem__  # type: ignore[attr-defined]
        lora = lora or {}
        check_lora_pairs(lora, config, LORA_MODULES, "GPT-2")
        scale = np.float32(lora_scale)
        # One scratch matrix serves every LoRA product: memory the process touches for the first
        # time costs more than the products themselves (page faults), so a load must not allocate
        # a fresh 7-9 MB buffer per matrix.
        largest = max(config.n_embd * 3 * config.n_embd, config.n_embd * config.n_ff)
        product = np.empty(largest, np.float32) if lora else None

        def matrix(name: str) -> np.ndarray:
            w = np.ascontiguousarray(get(f"{name}.weight"), np.float32)
            pair = lora.get(name)
            if pair is None:
                return w
            # this function's own copy (consume) is merged where it lies
            return merge_lora(w, *pair, scale, product, in_place=consume and w.flags.writeable)

        layers = []
        for i in range(config.n_layer):
            p = f"blk.{i}."
            layers.append(Layer(
                get(p + "attn_norm.weight"), get(p + "attn_norm.bias"),
                matrix(p + "attn_qkv"), get(p + "attn_qkv.bias"),
                matrix(p + "attn_output"), get(p + "attn_output.bias"),
                get(p + "ffn_norm.weight"), get(p + "ffn_norm.bias"),
                matrix(p + "ffn_up"), get(p + "ffn_up.bias"),
                matrix(p + "ffn_down"), get(p + "ffn_down.bias"),
            ))
        untied = "output.weight" in weights
        head = get("output.weight") if untied else get("token_embd.weight")
        return cls(head, get("token_embd.weight") if untied else None, get("position_embd.weight"),
                   get("output_norm.weight"), get("output_norm.bias"), tuple(layers))

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """(N, d) embedding rows of the tokens."""
        return (self.head if self.token_embd is None else self.token_embd)[tokens]


def merge_lora(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: np.float32, product: np.ndarray | None = None,
               in_place: bool = False) -> np.ndarray:
    """w + scale * (b @ a) in float32, for w (d_out, d_in), a (r, d_in), b (d_out, r).
    product: scratch of at least w.size floats (else one is allocated); in_place: add into w."""
    delta = (np.empty(w.size, np.float32) if product is None else product[:w.size]).reshape(w.shape)
    # alpha / r is a power of two for PAW programs (16 / 64): scaling B before the product then
    # gives the same bits as scaling B @ A after it, and saves a pass over the matrix.
    if float(np.frexp(scale)[0]) == 0.5:
        np.matmul(scale * b, a, out=delta)
    else:
        np.matmul(b, a, out=delta)
        delta *= scale
    if in_place:
        w += delta
        return w
    return w + delta


def check_lora_pairs(lora: Mapping[str, tuple[np.ndarray, np.ndarray]], config, modules: Iterable[str], model: str) -> None:
    """LoraAdapter checks its file against the base on load; this is for pairs handed in directly:
    every target a `blk.N.<module>` of the base (`config.n_layer`, `config.module_dims`), every pair
    A (r, d_in), B (d_out, r). Shared by both families (`model` names the base in errors)."""
    modules = list(modules)
    for target, pair in lora.items():
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", target)
        module = m.group(2) if m else ""
        if module not in modules or int(m.group(1)) >= config.n_layer:
            raise IncompatibleModelError(f"LoRA target {target!r} is not a module of this {config.n_layer}-layer {model} "
                                         f"(expected blk.N.{{{'|'.join(modules)}}} with N < {config.n_layer})")
        d_in, d_out = config.module_dims(module)
        a, b = pair
        r = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or b.ndim != 2 or a.shape != (r, d_in) or b.shape != (d_out, r) or r <= 0:
            raise IncompatibleModelError(f"LoRA pair of {target} has shapes A {a.shape}, B {b.shape}; "
                                         f"expected A (r, {d_in}) and B ({d_out}, r) for this base model")
