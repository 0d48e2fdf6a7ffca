"""The GPT-2 forward pass in NumPy, fp32, with a preallocated KV cache: the plain reference.

Weights use GGUF names; matrices keep the Linear layout (d_out, d_in), so a layer is `x @ w.T + b`.
The runtime runs `engine.py` (the same math with product forms chosen for speed, a shared prefix and
batches); tests hold the two together."""

from __future__ import annotations

import numpy as np

from .gpt2_layout import GPT2Config

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


def block(x: np.ndarray, w: dict[str, np.ndarray], i: int, config: GPT2Config, cache: KVCache, n_past: int) -> np.ndarray:
    """One transformer block over x: (T, d) at positions n_past.. ; writes its keys and values to the cache."""
    T, d = x.shape
    H, hd = config.n_head, config.head_dim
    p = f"blk.{i}."
    h = layer_norm(x, w[p + "attn_norm.weight"], w[p + "attn_norm.bias"], config.eps)
    qkv = h @ w[p + "attn_qkv.weight"].T + w[p + "attn_qkv.bias"]  # (T, 3d)
    q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(T, H, hd).transpose(1, 0, 2) for j in range(3))  # (H, T, hd)
    end = n_past + T
    cache.k[i, :, n_past:end] = k
    cache.v[i, :, n_past:end] = v
    a = attention(q, cache.k[i, :, :end], cache.v[i, :, :end], n_past)  # (H, T, hd)
    a = a.transpose(1, 0, 2).reshape(T, d)
    x = x + (a @ w[p + "attn_output.weight"].T + w[p + "attn_output.bias"])
    h = layer_norm(x, w[p + "ffn_norm.weight"], w[p + "ffn_norm.bias"], config.eps)
    h = gelu(h @ w[p + "ffn_up.weight"].T + w[p + "ffn_up.bias"])  # (T, n_ff)
    return x + (h @ w[p + "ffn_down.weight"].T + w[p + "ffn_down.bias"])


def forward(tokens: list[int] | np.ndarray, w: dict[str, np.ndarray], config: GPT2Config, cache: KVCache,
            n_past: int, all_logits: bool = False) -> np.ndarray:
    """Evaluate tokens at positions n_past.. and return logits: (n_vocab,) for the last position,
    or (T, n_vocab) with all_logits."""
    ids = np.asarray(tokens, dtype=np.int64)
    T = ids.shape[0]
    assert T > 0 and n_past + T <= config.n_ctx
    x = w["token_embd.weight"][ids] + w["position_embd.weight"][n_past:n_past + T]  # (T, d)
    for i in range(config.n_layer):
        x = block(x, w, i, config, cache, n_past)
    if not all_logits:
        x = x[-1:]
    x = layer_norm(x, w["output_norm.weight"], w["output_norm.bias"], config.eps)
    logits = x @ w.get("output.weight", w["token_embd.weight"]).T  # (T or 1, n_vocab)
    return logits if all_logits else logits[0]
