"""The GPT-2 forward pass in NumPy, fp32, with a preallocated KV cache: the plain reference.

The weights are `gpt2_weights.Weights` (matrices in the Linear layout (d_out, d_in), so a layer is
`x @ w.T + b`). The runtime runs `gpt2_packed.py`, the same math over the packed rows of many
sequences with product forms chosen for speed (`engine.py` drives it); tests hold the two together."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import ContextOverflowError, InvalidInputError
from .gpt2_layout import GPT2Config
from .gpt2_weights import Layer, Weights

SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))
GELU_C = np.float32(0.044715)


class KVCache:
    """Keys and values of every layer: (n_layer, n_head, n_ctx, head_dim). np.zeros maps lazily,
    so memory is only touched as positions fill."""

    def __init__(self, config: GPT2Config):
        shape = (config.n_layer, config.n_head, config.n_ctx, config.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=-1, keepdims=True)
    return centered / np.sqrt(var + np.float32(eps)) * g + b


def gelu(x: np.ndarray) -> np.ndarray:
    """GPT-2's tanh approximation ("gelu_new")."""
    return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int) -> np.ndarray:
    """q: (H, T, hd) for positions n_past..n_past+T-1; k, v: (H, n_past+T, hd). Returns (H, T, hd)."""
    T, S = q.shape[1], k.shape[1]
    scores = (q @ k.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(q.shape[-1]))  # (H, T, S)
    if T > 1:
        # query t sees keys 0..n_past+t
        future = np.arange(S)[None, :] > (n_past + np.arange(T))[:, None]  # (T, S)
        scores[:, future] = -np.inf
    return softmax(scores) @ v


def block(x: np.ndarray, layer: Layer, i: int, config: GPT2Config, cache: KVCache, n_past: int) -> np.ndarray:
    """Block i over x: (T, d) at positions n_past.. ; writes its keys and values to the cache."""
    T, d = x.shape
    H, hd = config.n_head, config.head_dim
    h = layer_norm(x, layer.attn_norm_w, layer.attn_norm_b, config.eps)
    qkv = h @ layer.attn_qkv.T + layer.attn_qkv_b  # (T, 3d)
    q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(T, H, hd).transpose(1, 0, 2) for j in range(3))  # (H, T, hd)
    end = n_past + T
    cache.k[i, :, n_past:end] = k
    cache.v[i, :, n_past:end] = v
    a = attention(q, cache.k[i, :, :end], cache.v[i, :, :end], n_past)  # (H, T, hd)
    a = a.transpose(1, 0, 2).reshape(T, d)
    x = x + (a @ layer.attn_output.T + layer.attn_output_b)
    h = layer_norm(x, layer.ffn_norm_w, layer.ffn_norm_b, config.eps)
    h = gelu(h @ layer.ffn_up.T + layer.ffn_up_b)  # (T, n_ff)
    return x + (h @ layer.ffn_down.T + layer.ffn_down_b)


def forward(tokens: list[int] | np.ndarray, w: Weights | Mapping[str, np.ndarray], config: GPT2Config,
            cache: KVCache, n_past: int, all_logits: bool = False) -> np.ndarray:
    """Evaluate tokens at positions n_past.. and return logits: (n_vocab,) for the last position,
    or (T, n_vocab) with all_logits. w: the model's Weights, or its GGUF-named tensors
    (`BaseModel.weights`, taken as they are)."""
    if not isinstance(w, Weights):
        w = Weights.from_gguf_names(w, config)
    ids = _checked_tokens(tokens, config, n_past)
    T = ids.shape[0]
    x = w.embed(ids) + w.position_embd[n_past:n_past + T]  # (T, d)
    for i, layer in enumerate(w.layers):
        x = block(x, layer, i, config, cache, n_past)
    if not all_logits:
        x = x[-1:]
    x = layer_norm(x, w.output_norm_w, w.output_norm_b, config.eps)
    logits = x @ w.head.T  # (T or 1, n_vocab)
    return logits if all_logits else logits[0]


def _checked_tokens(tokens: list[int] | np.ndarray, config: GPT2Config, n_past: int) -> np.ndarray:
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1 or ids.shape[0] == 0:
        raise InvalidInputError(f"tokens must be a non-empty list of token ids, got shape {ids.shape}")
    if not 0 <= n_past <= config.n_ctx:
        raise InvalidInputError(f"n_past is {n_past}, expected 0..{config.n_ctx}")
    if n_past + len(ids) > config.n_ctx:
        raise ContextOverflowError(f"{len(ids)} tokens after {n_past} cached ones pass the context of {config.n_ctx}")
    bad = (ids < 0) | (ids >= config.n_vocab)
    if bad.any():
        raise InvalidInputError(f"token id {int(ids[bad][0])} is outside the vocabulary (0..{config.n_vocab - 1})")
    return ids
