"""The Qwen3 forward pass in NumPy, fp32, with a preallocated KV cache: the plain reference.

Read it next to `gpt2.py`; what differs from GPT-2:
- RMSNorm (no mean, no bias) instead of LayerNorm;
- no position embedding: rotary embeddings turn each query and key head by its position, with the
  NEOX pairing (dimension j with j + head_dim/2, as HF's `rotate_half` and llama.cpp's qwen3 graph);
- grouped-query attention: n_head query heads share n_head_kv key/value heads (query head h reads
  kv head h // (n_head / n_head_kv)), so the cache holds n_head_kv heads;
- each query and key head is RMS-normalised (attn_q_norm, attn_k_norm) before the rotation;
- a SwiGLU MLP: ffn_down(silu(ffn_gate(x)) * ffn_up(x)); no biases anywhere;
- the output head is the token embedding (tied), unless the file has its own output.weight.

The weights are `qwen3_weights.Qwen3Weights`. The runtime runs `qwen3_packed.py`, the same math over
the packed rows of many sequences; tests hold the two together and against transformers."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import ContextOverflowError, InvalidInputError
from .gpt2 import softmax
from .qwen3_layout import Qwen3Config
from .qwen3_weights import Qwen3Layer, Qwen3Weights


class KVCache:
    """Keys and values of every layer: (n_layer, n_head_kv, n_ctx, head_dim), rotated keys."""

    def __init__(self, config: Qwen3Config, n_ctx: int | None = None):
        shape = (config.n_layer, config.n_head_kv, n_ctx or config.n_ctx, config.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)


def rms_norm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * g over the last axis."""
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + np.float32(eps)) * g


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def rope_angles(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (T, head_dim / 2): position p turns pair j by p * theta^(-2j / head_dim).
    In float32 as transformers computes them (inv_freq = 1 / theta^(2j / hd), one product with the
    position): past a thousand positions float32 angles differ from exact ones by ~1e-4 radians,
    and matching the model's reference keeps logits within 1e-4 of it there (measured)."""
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponent)  # (hd/2,)
    angles = np.asarray(positions).astype(np.float32)[:, None] * inv_freq[None, :]  # (T, hd/2)
    return np.cos(angles), np.sin(angles)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x (T, heads, hd) NEOX-style: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), where x1
    is the first half of each head and x2 the second."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, hd/2): the same angle for every head
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int) -> np.ndarray:
    """q: (H, T, hd) for positions n_past..n_past+T-1; k, v: (H_kv, n_past+T, hd). Returns (H, T, hd)."""
    H, T, hd = q.shape
    group = H // k.shape[0]
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # query head h reads kv head h // group
    S = k.shape[1]
    scores = (q @ k.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(hd))  # (H, T, S)
    if T > 1:
        future = np.arange(S)[None, :] > (n_past + np.arange(T))[:, None]  # (T, S)
        scores[:, future] = -np.inf
    return softmax(scores) @ v


def block(x: np.ndarray, layer: Qwen3Layer, i: int, config: Qwen3Config, cache: KVCache, n_past: int,
          cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Layer i over x: (T, d) at positions n_past.. ; writes its keys and values to the cache."""
    T, d = x.shape
    H, Hkv, hd = config.n_head, config.n_head_kv, config.head_dim
    h = rms_norm(x, layer.attn_norm, config.eps)
    q = (h @ layer.attn_q.T).reshape(T, H, hd)
    k = (h @ layer.attn_k.T).reshape(T, Hkv, hd)
    v = (h @ layer.attn_v.T).reshape(T, Hkv, hd)
    q = rope(rms_norm(q, layer.attn_q_norm, config.eps), cos, sin)
    k = rope(rms_norm(k, layer.attn_k_norm, config.eps), cos, sin)
    end = n_past + T
    cache.k[i, :, n_past:end] = k.transpose(1, 0, 2)  # (Hkv, T, hd)
    cache.v[i, :, n_past:end] = v.transpose(1, 0, 2)
    a = attention(q.transpose(1, 0, 2), cache.k[i, :, :end], cache.v[i, :, :end], n_past)  # (H, T, hd)
    x = x + a.transpose(1, 0, 2).reshape(T, H * hd) @ layer.attn_output.T
    h = rms_norm(x, layer.ffn_norm, config.eps)
    h = silu(h @ layer.ffn_gate.T) * (h @ layer.ffn_up.T)  # (T, n_ff)
    return x + h @ layer.ffn_down.T


def forward(tokens: list[int] | np.ndarray, w: Qwen3Weights | Mapping[str, np.ndarray], config: Qwen3Config,
            cache: KVCache, n_past: int, all_logits: bool = False) -> np.ndarray:
    """Evaluate tokens at positions n_past.. and return logits: (n_vocab,) for the last position,
    or (T, n_vocab) with all_logits. w: Qwen3Weights, or GGUF-named float32 tensors."""
    if not isinstance(w, Qwen3Weights):
        w = Qwen3Weights.from_gguf_names(w, config)
    ids = _checked_tokens(tokens, config, n_past, cache.k.shape[2])
    T = ids.shape[0]
    cos, sin = rope_angles(np.arange(n_past, n_past + T), config.head_dim, config.rope_theta)
    x = w.embed(ids)  # (T, d)
    for i, layer in enumerate(w.layers):
        x = block(x, layer, i, config, cache, n_past, cos, sin)
    if not all_logits:
        x = x[-1:]
    logits = rms_norm(x, w.output_norm, config.eps) @ w.head.T  # (T or 1, n_vocab)
    return logits if all_logits else logits[0]


def _checked_tokens(tokens: list[int] | np.ndarray, config: Qwen3Config, n_past: int, n_ctx: int) -> np.ndarray:
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1 or ids.shape[0] == 0:
        raise InvalidInputError(f"tokens must be a non-empty list of token ids, got shape {ids.shape}")
    if not 0 <= n_past <= n_ctx:
        raise InvalidInputError(f"n_past is {n_past}, expected 0..{n_ctx}")
    if n_past + len(ids) > n_ctx:
        raise ContextOverflowError(f"{len(ids)} tokens after {n_past} cached ones pass the cache's {n_ctx} positions")
    bad = (ids < 0) | (ids >= config.n_vocab)
    if bad.any():
        raise InvalidInputError(f"token id {int(ids[bad][0])} is outside the vocabulary (0..{config.n_vocab - 1})")
    return ids
