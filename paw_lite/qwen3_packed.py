"""The Qwen3 forward pass the runtime runs: `qwen3.py`'s math over the packed rows of one step,
tokens of many sequences one after another, each writing its (rotated) keys and values to its slot
of a `kv_cache.SlotCache` (n_head_kv heads) and attending over the shared prefix and its own keys
(`attention.attend`, grouped-query). The same scheduler, caches and map workers as GPT-2
(`gpt2_packed.py`, whose layout this file follows); `engine.Engine.qwen3` puts them together.

Read it next to `qwen3.forward`: embed -> layers -> final norm -> head. The kernels below compute
qwen3.py's element-wise operations in its order; the matmul shapes differ, so logits agree with
the reference to ~1e-5, not bit for bit (tests/test_qwen3_interpreter.py states the figures). A
step streams the float32 weights (~2.4 GB for Qwen3-0.6B, 0.6 GB of it the head) once; many
sequences share that stream."""

from __future__ import annotations

import numpy as np

from .attention import Groups, attend, attention_groups, wanted_rows
from .kv_cache import KVShape, SlotCache, Step
from .products import SMALL_PRODUCT_ROWS, Head, HeadPicks, project
from .qwen3 import rope_angles
from .qwen3_layout import Qwen3Config
from .qwen3_weights import Qwen3Layer, Qwen3Weights


class Qwen3Packed(HeadPicks):
    """Qwen3 over packed rows, with activation buffers of its own: one per thread (`fork`)."""

    # Keys and values a map (or a served batch) may hold, and rows one step evaluates: Qwen3-0.6B's
    # float32 weights take 2.38 GB and a Standard program is meant to run in 3.2 GB (issue #20).
    # Measured on 2 cores, a fresh process mapping standard_bench's 256 inputs (8 tokens each),
    # peak RSS and throughput by KV budget and step rows: 512 MiB / 2,048 rows, 3,270 MiB and
    # 2.7-2.8 calls/s; 384 / 2,048, 3,118 MiB and 2.76; 256 / 2,048, 2,893 MiB and 1.71 (too few
    # sequences in flight per worker); 512 / 512, 3,225 MiB and 2.68; 384 / 512 (these), 2,976 MiB
    # and 2.75. 512-row steps keep each thread's activation buffers at ~50 MB, not ~200 MB, and
    # still run the products at full speed (450 GFLOP a step).
    map_kv_budget = 384 << 20
    max_step_rows = 512

    def __init__(self, weights: Qwen3Weights, config: Qwen3Config):
        self.w = weights
        self.config = config
        self.kv_shape = KVShape(config.n_layer, config.n_head_kv, config.head_dim, config.n_ctx)
        self.n_vocab = config.n_vocab
        self.head = Head(weights.head)
        self._scale = np.float32(1.0 / np.sqrt(config.head_dim))
        self._ws: _Workspace | None = None

    def fork(self) -> "Qwen3Packed":
        """The same weights with buffers of its own, for another thread."""
        return Qwen3Packed(self.w, self.config)

    def forward(self, cache: SlotCache, step: Step, tokens: np.ndarray, wanted: np.ndarray) -> np.ndarray | None:
        """Evaluate the step's tokens through every layer (writing their keys and values to the
        cache) and return the final normalised hidden rows (S', d) after the last token of each
        segment `wanted` (bool per segment) selects, or None when it selects none."""
        c, w = self.config, self.w
        ws = self._workspace(len(tokens))
        x = ws.x[:len(tokens)]
        np.copyto(x, w.embed(tokens))  # (N, d)
        cos, sin = rope_angles(step.positions(cache), c.head_dim, c.rope_theta)  # (N, hd/2), shared by every layer
        groups = attention_groups(step, cache)
        *inner, final = w.layers
        for i, layer in enumerate(inner):
            q = self._attention_input(x, i, layer, cache, groups, cos, sin, ws)
            self._block_rest(x, q, i, layer, cache, groups, ws)
        # The last layer's outputs feed nothing but the logits: every row's keys and values are
        # stored, the rest of the layer runs only on the rows whose logits are wanted.
        q = self._attention_input(x, c.n_layer - 1, final, cache, groups, cos, sin, ws)
        if not wanted.any():
            return None
        at, tail = wanted_rows(step, wanted, cache, groups)
        rows = x if at is None else x[at]  # (S', d); a copy when some rows are left out
        self._block_rest(rows, q if at is None else np.ascontiguousarray(q[:, at]), c.n_layer - 1, final, cache, tail, ws)
        return rms_norm_into(rows, w.output_norm, c.eps, np.empty_like(rows), ws.sq[:len(rows)])

    # -- a layer, in two halves: the last layer runs its second half on fewer rows ---------------

    def _attention_input(self, x: np.ndarray, i: int, layer: Qwen3Layer, cache: SlotCache, groups: Groups,
                         cos: np.ndarray, sin: np.ndarray, ws: "_Workspace") -> np.ndarray:
        """The first half of a layer over the packed rows x (N, d): normalise, project, normalise
        and rotate the query and key heads, store the keys and values in the cache; returns the
        queries (H, N, hd), a view into the workspace."""
        c = self.config
        N = len(x)
        H, Hkv, hd = c.n_head, c.n_head_kv, c.head_dim
        nq, nkv = H * hd, Hkv * hd
        h, qkv = ws.h[:N], ws.qkv[:N]
        rms_norm_into(x, layer.attn_norm, c.eps, h, ws.sq[:N])
        project(h, layer.attn_qkv, qkv, ws.product)  # (N, q + 2 kv)
        q = ws.q[:N]  # (N, H, hd)
        k = ws.k[:N]  # (N, Hkv, hd)
        rms_norm_into(qkv[:, :nq].reshape(N, H, hd), layer.attn_q_norm, c.eps, q, ws.q_sq[:N])
        rms_norm_into(qkv[:, nq:nq + nkv].reshape(N, Hkv, hd), layer.attn_k_norm, c.eps, k, ws.q_sq[:N, :Hkv])
        rope_inplace(q, cos, sin, ws.rot[:N])
        rope_inplace(k, cos, sin, ws.rot[:N, :Hkv])
        kT = k.transpose(1, 0, 2)  # (Hkv, N, hd)
        vT = qkv[:, nq + nkv:].reshape(N, Hkv, hd).transpose(1, 0, 2)
        for r0, r1, plan in groups:
            plan.store(cache.k[i], kT[:, r0:r1])
            plan.store(cache.v[i], vT[:, r0:r1])
        return q.transpose(1, 0, 2)  # (H, N, hd)

    def _block_rest(self, x: np.ndarray, q: np.ndarray, i: int, layer: Qwen3Layer, cache: SlotCache, groups: Groups,
                    ws: "_Workspace") -> None:
        """The rest of the layer for the rows x (N, d) and their queries q (H, N, hd), in place."""
        c = self.config
        N = len(x)
        H, hd, ff = c.n_head, c.head_dim, c.n_ff
        h, att, gu, act, sq = ws.h[:N], ws.att[:N], ws.gu[:N], ws.act[:N], ws.sq[:N]
        for r0, r1, plan in groups:
            a = attend(q[:, r0:r1], i, cache, plan, self._scale)  # (H, n, hd)
            np.copyto(att[r0:r1].reshape(r1 - r0, H, hd), a.transpose(1, 0, 2))
        project(att, layer.attn_output, h, ws.product)
        x += h
        rms_norm_into(x, layer.ffn_norm, c.eps, h, sq)
        project(h, layer.ffn_gate_up, gu, ws.product)  # (N, 2 n_ff): gate, then up
        swiglu_into(gu[:, :ff], gu[:, ff:], act)  # (N, n_ff)
        project(act, layer.ffn_down, h, ws.product)
        x += h

    def _workspace(self, n_rows: int) -> "_Workspace":
        ws = self._ws
        if ws is None or ws.x.shape[0] < n_rows:
            ws = self._ws = _Workspace(self.config, max(n_rows, 1))
        return ws


class _Workspace:
    """Activation buffers for up to n_rows packed tokens, allocated once and reused by every step."""

    def __init__(self, c: Qwen3Config, n_rows: int):
        d, nq, nkv = c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        self.x = np.empty((n_rows, d), np.float32)
        self.h = np.empty((n_rows, d), np.float32)
        self.sq = np.empty((n_rows, d), np.float32)
        self.qkv = np.empty((n_rows, nq + 2 * nkv), np.float32)
        self.q = np.empty((n_rows, c.n_head, c.head_dim), np.float32)
        self.k = np.empty((n_rows, c.n_head_kv, c.head_dim), np.float32)
        self.q_sq = np.empty((n_rows, c.n_head, c.head_dim), np.float32)
        self.rot = np.empty((n_rows, c.n_head, c.head_dim // 2), np.float32)
        self.att = np.empty((n_rows, nq), np.float32)
        self.gu = np.empty((n_rows, 2 * c.n_ff), np.float32)
        self.act = np.empty((n_rows, c.n_ff), np.float32)
        widest = max(nq + 2 * nkv, 2 * c.n_ff, d)
        self.product = np.empty(widest * min(n_rows, SMALL_PRODUCT_ROWS), np.float32)


def rms_norm_into(x: np.ndarray, g: np.ndarray, eps: float, out: np.ndarray, sq: np.ndarray) -> np.ndarray:
    """qwen3.rms_norm into `out` (sq: scratch of x's shape) over the last axis: the same float32
    operations in the same order, without np.mean's Python wrapper (it runs 4 times a layer)."""
    np.multiply(x, x, out=sq)
    ms = np.add.reduce(sq, axis=-1, keepdims=True)
    ms /= np.float32(x.shape[-1])
    ms += np.float32(eps)
    np.sqrt(ms, out=ms)
    np.divide(x, ms, out=out)
    out *= g
    return out


def rope_inplace(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, tmp: np.ndarray) -> None:
    """qwen3.rope in place on x (N, heads, hd); tmp: scratch (N, heads, hd/2). The same operations:
    x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    np.multiply(x1, s, out=tmp)  # x1 sin, before x1 is overwritten
    x1 *= c
    x1 -= x2 * s
    x2 *= c
    x2 += tmp


def swiglu_into(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
    """out = silu(gate) * up = gate / (1 + exp(-gate)) * up, qwen3.py's operations in its order."""
    np.negative(gate, out=out)
    np.exp(out, out=out)
    out += np.float32(1.0)
    np.divide(gate, out, out=out)
    out *= up
