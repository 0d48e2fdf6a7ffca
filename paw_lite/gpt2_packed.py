"""The GPT-2 forward pass the runtime runs: `gpt2.py`'s math over the packed rows of one step,
tokens of many sequences one after another, each writing its keys and values to its slot of a
`kv_cache.SlotCache` and attending over the shared prefix and its own keys (`attention.py`).
`scheduler.py` decides which rows a step holds; `engine.py` puts the two together.

Read it next to `gpt2.forward`: embed -> blocks -> final norm -> head. Every op is float32 and
the in-place kernels below compute gpt2.py's operations in its order (the same bits); the matmul
shapes differ, so logits agree with the reference to ~5e-6, not bit for bit (tests/test_batch_map.py
states the measured figures). Memory-wise a step is bound by streaming the float32 weights (~500 MB
for GPT-2 124M) once; many sequences share that stream, which is where NumPy wins."""

from __future__ import annotations

import numpy as np

from .attention import Groups, attend, attention_groups, wanted_rows
from .gpt2 import GELU_C, SQRT_2_OVER_PI
from .gpt2_layout import GPT2Config
from .gpt2_weights import Layer, Weights
from .kv_cache import KVShape, SlotCache, Step
from .products import SMALL_PRODUCT_ROWS, Head, HeadPicks, project

_GELU_ROWS = 64  # rows per GELU pass: (64, n_ff) float32 stays in L2 across its eight passes


class GPT2Packed(HeadPicks):
    """GPT-2 over packed rows, with activation buffers of its own: one per thread (`fork`)."""

    map_kv_budget = None  # fn.map's own (parallel_map.MAP_KV_BUDGET, 1 GiB) beside ~0.5 GB of weights
    max_step_rows = None  # scheduler.MAX_ROWS

    def __init__(self, weights: Weights, config: GPT2Config):
        self.w = weights
        self.config = config
        self.kv_shape = KVShape(config.n_layer, config.n_head, config.head_dim, config.n_ctx)
        self.n_vocab = config.n_vocab
        self.head = Head(weights.head)
        self._scale = np.float32(1.0 / np.sqrt(config.head_dim))
        self._ws: _Workspace | None = None

    def fork(self) -> "GPT2Packed":
        """The same weights with buffers of its own, for another thread."""
        return GPT2Packed(self.w, self.config)

    def forward(self, cache: SlotCache, step: Step, tokens: np.ndarray, wanted: np.ndarray) -> np.ndarray | None:
        """Evaluate the step's tokens through every layer (writing their keys and values to the
        cache) and return the final normalised hidden rows (S', d) after the last token of each
        segment `wanted` (bool per segment) selects, or None when it selects none."""
        c, w = self.config, self.w
        ws = self._workspace(len(tokens))
        x = ws.x[:len(tokens)]
        np.add(w.embed(tokens), w.position_embd[step.positions(cache)], out=x)  # (N, d)
        groups = attention_groups(step, cache)
        *inner, final = w.layers
        for i, layer in enumerate(inner):
            q = self._attention_input(x, i, layer, cache, groups, ws)
            self._block_rest(x, q, i, layer, cache, groups, ws)
        # The last block's outputs feed nothing but the logits: every row's keys and values are
        # stored, the rest of the block runs only on the rows whose logits are wanted.
        q = self._attention_input(x, c.n_layer - 1, final, cache, groups, ws)
        if not wanted.any():
            return None
        at, tail = wanted_rows(step, wanted, cache, groups)
        rows = x if at is None else x[at]  # (S', d); a copy when some rows are left out
        self._block_rest(rows, q if at is None else np.ascontiguousarray(q[:, at]), c.n_layer - 1, final, cache, tail, ws)
        return layer_norm_into(rows, w.output_norm_w, w.output_norm_b, c.eps, ws.att[:len(rows)], ws.sq[:len(rows)])

    # -- a block, in two halves: the last block runs its second half on fewer rows ---------------

    def _attention_input(self, x: np.ndarray, i: int, layer: Layer, cache: SlotCache, groups: Groups,
                         ws: "_Workspace") -> np.ndarray:
        """The first half of a block over the packed rows x (N, d): normalise, project, store the
        keys and values in the cache; returns the queries (H, N, hd), a view into the workspace."""
        c = self.config
        N, d = x.shape
        H, hd = c.n_head, c.head_dim
        h, qkv = ws.h[:N], ws.qkv[:N]
        layer_norm_into(x, layer.attn_norm_w, layer.attn_norm_b, c.eps, h, ws.sq[:N])
        project(h, layer.attn_qkv, qkv, ws.product)
        qkv += layer.attn_qkv_b  # (N, 3d)
        q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(N, H, hd).transpose(1, 0, 2) for j in range(3))  # (H, N, hd)
        for r0, r1, plan in groups:
            plan.store(cache.k[i], k[:, r0:r1])
            plan.store(cache.v[i], v[:, r0:r1])
        return q

    def _block_rest(self, x: np.ndarray, q: np.ndarray, i: int, layer: Layer, cache: SlotCache, groups: Groups,
                    ws: "_Workspace") -> None:
        """The rest of the block for the rows x (N, d) and their queries q (H, N, hd), in place."""
        c = self.config
        N, d = x.shape
        H, hd = c.n_head, c.head_dim
        h, att, up, sq = ws.h[:N], ws.att[:N], ws.up[:N], ws.sq[:N]
        for r0, r1, plan in groups:
            a = attend(q[:, r0:r1], i, cache, plan, self._scale)  # (H, n, hd)
            np.copyto(att[r0:r1].reshape(r1 - r0, H, hd), a.transpose(1, 0, 2))
        project(att, layer.attn_output, h, ws.product)
        h += layer.attn_output_b
        x += h
        layer_norm_into(x, layer.ffn_norm_w, layer.ffn_norm_b, c.eps, h, sq)
        project(h, layer.ffn_up, up, ws.product)
        up += layer.ffn_up_b
        gelu_inplace(up, ws.tmp)  # (N, n_ff)
        project(up, layer.ffn_down, h, ws.product)
        h += layer.ffn_down_b
        x += h

    def _workspace(self, n_rows: int) -> "_Workspace":
        ws = self._ws
        if ws is None or ws.x.shape[0] < n_rows:
            ws = self._ws = _Workspace(self.config, max(n_rows, 1))
        return ws


class _Workspace:
    """Activation buffers for up to n_rows packed tokens, allocated once and reused by every step."""

    def __init__(self, config: GPT2Config, n_rows: int):
        d = config.n_embd
        self.x = np.empty((n_rows, d), np.float32)
        self.h = np.empty((n_rows, d), np.float32)
        self.att = np.empty((n_rows, d), np.float32)
        self.sq = np.empty((n_rows, d), np.float32)
        self.qkv = np.empty((n_rows, 3 * d), np.float32)
        self.up = np.empty((n_rows, config.n_ff), np.float32)
        self.tmp = np.empty((_GELU_ROWS, config.n_ff), np.float32)
        self.product = np.empty(max(3 * d, config.n_ff) * min(n_rows, SMALL_PRODUCT_ROWS), np.float32)


def layer_norm_into(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float, out: np.ndarray,
                    sq: np.ndarray) -> np.ndarray:
    """gpt2.layer_norm into `out` (sq: scratch of x's shape): the same float32 operations in the
    same order, so the same bits, without np.mean's Python wrapper (it runs 25 times a token)."""
    n = np.float32(x.shape[-1])
    mean = np.add.reduce(x, axis=-1, keepdims=True)
    mean /= n
    np.subtract(x, mean, out=out)
    np.multiply(out, out, out=sq)
    var = np.add.reduce(sq, axis=-1, keepdims=True)
    var /= n
    var += np.float32(eps)
    np.sqrt(var, out=var)
    out /= var
    out *= g
    out += b
    return out


def gelu_inplace(x: np.ndarray, tmp: np.ndarray) -> None:
    """gpt2.gelu in place, row block by row block so the passes run in cache; same operations,
    same order, so the same bits: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x * x * x)))."""
    for r in range(0, x.shape[0], tmp.shape[0]):
        v = x[r:r + tmp.shape[0]]
        t = tmp[:v.shape[0]]
        np.multiply(v, GELU_C, out=t)
        t *= v
        t *= v
        t += v
        t *= SQRT_2_OVER_PI
        np.tanh(t, out=t)
        t += 1.0
        v *= 0.5
        v *= t
