"""Causal attention of packed rows over their sequences' keys: the plan of which cache entries each
row sees (`AttentionPlan`, one per group of segments), and the attention itself (`attend`), the
prefix's keys and a sequence's own keys as two blocks under one softmax.

Model-independent: a layer's queries (H, N, hd) and its slot of a `kv_cache.SlotCache` (H_kv heads:
H for GPT-2, fewer for Qwen3's grouped-query attention) are all it needs, whatever computed them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kv_cache import SlotCache, Step

_NEG_INF = np.float32(-np.inf)
_SCORES_PER_CHUNK = 256 * 1024  # attention scores per head chunk: 1 MB of float32, half of L2


@dataclass(frozen=True)
class AttentionPlan:
    """How a group of segments maps onto the padded (slot, query) grid attention works on. The
    grid's slots are the segments' own, or, for one query per segment on scattered slots, the
    whole slot range they span (zero queries for the others): reading a range of the cache is a
    view, gathering scattered slots would copy every live sequence's keys at every layer."""

    grid_slots: np.ndarray  # (G,) cache slot of each grid entry
    tq: int  # queries per grid entry (padded)
    tk: int  # own keys any segment can see
    flat: np.ndarray | None  # grid index of each packed row; None when the rows fill the grid
    rows_slot: np.ndarray  # (N,) cache slot of each packed row
    rows_index: np.ndarray  # (N,) own index of each packed row
    block: tuple[slice, slice] | None  # (slots, own indices) when the rows fill a rectangle of the cache
    hidden: np.ndarray | None  # (G, Tq, Tk - hidden_from) True where a key is in a query's future
    hidden_from: int  # keys before this own index are visible to every query (a call's cached prefix)
    prefix_hidden: np.ndarray | None  # (G, 1, P) True for prefix keys a sequence does not share
    consecutive: bool  # the grid's slots are consecutive: their caches are one view

    @classmethod
    def of(cls, step: Step, cache: SlotCache) -> "AttentionPlan":
        seg, offset = step.rows()
        S = len(step.count)
        tq = int(step.count.max())
        tk = int((step.first + step.count).max())
        lo, hi = int(step.slot.min()), int(step.slot.max())
        consecutive = bool((np.diff(step.slot) == 1).all())
        if not consecutive and tq == 1 and hi - lo + 1 <= 2 * S:
            grid_slots, grid, grid_consecutive = np.arange(lo, hi + 1), step.slot - lo, True
        else:
            grid_slots, grid, grid_consecutive = step.slot, np.arange(S), consecutive
        G = len(grid_slots)
        identity = G == S and bool((grid == np.arange(S)).all())
        flat = None if identity and S * tq == len(seg) else grid[seg] * tq + offset
        rectangle = (flat is None and consecutive and bool((step.first == step.first[0]).all()))
        block = (slice(lo, lo + S), slice(int(step.first[0]), int(step.first[0]) + tq)) if rectangle else None
        first = np.zeros(G, np.int64)  # grid entries without a segment see key 0 only: finite, discarded
        first[grid] = step.first
        visible = np.arange(tk)[None, None, :] <= (first[:, None, None] + np.arange(tq)[None, :, None])
        hidden_from = int(first.min()) + 1
        P = cache.prefix_k.shape[2]
        shared = np.full(G, P, np.int64)
        shared[grid] = cache.visible[step.slot]
        prefix_hidden = np.arange(P)[None, None, :] >= shared[:, None, None] if (shared < P).any() else None
        return cls(grid_slots, tq, tk, flat, step.slot[seg], step.first[seg] + offset, block,
                   None if visible.all() else ~visible[..., hidden_from:], hidden_from, prefix_hidden, grid_consecutive)

    @property
    def n_grid(self) -> int:
        return len(self.grid_slots)

    def store(self, cache: np.ndarray, values: np.ndarray) -> None:
        """Write the rows' keys or values (H, N, hd) into a layer's cache (H, B, cap, hd)."""
        if self.block is not None:  # consecutive slots at the same own positions: a plain slice
            slots, index = self.block
            cache[:, slots, index] = values.reshape(values.shape[0], self.n_grid, self.tq, values.shape[2])
        else:
            cache[:, self.rows_slot, self.rows_index] = values

    def own(self, cache: np.ndarray) -> np.ndarray:
        """The grid's own keys or values (H, G, Tk, hd): a view when its slots are consecutive."""
        if self.consecutive:
            lo = int(self.grid_slots[0])
            return cache[:, lo:lo + self.n_grid, :self.tk]
        return cache[:, self.grid_slots, :self.tk]

    def pad(self, q: np.ndarray) -> np.ndarray:
        if self.flat is None:
            return q
        out = np.zeros((q.shape[0], self.n_grid * self.tq, q.shape[2]), np.float32)
        out[:, self.flat] = q
        return out

    def unpad(self, out: np.ndarray) -> np.ndarray:
        return out if self.flat is None else out[:, self.flat]


Groups = list[tuple[int, int, AttentionPlan]]  # (first packed row, end row, plan) of each attention group


def attention_groups(step: Step, cache: SlotCache) -> Groups:
    """(first row, end row, plan) per run of segments: one-token segments (decoding) and longer
    ones (prompts) are planned apart, so the short ones are not padded to the prompts' length."""
    single = step.count == 1
    cuts = [0, *(np.flatnonzero(single[1:] != single[:-1]) + 1).tolist(), len(single)]
    row = np.concatenate([[0], np.cumsum(step.count)])
    return [(int(row[a]), int(row[b]), AttentionPlan.of(Step(step.slot[a:b], step.first[a:b], step.count[a:b]), cache))
            for a, b in zip(cuts, cuts[1:])]


def wanted_rows(step: Step, wanted: np.ndarray, cache: SlotCache, groups: Groups) -> tuple[np.ndarray | None, Groups]:
    """The rows a model's last layer finishes: each wanted segment's last token (its outputs feed
    nothing but the logits; the other rows only store their keys and values there). Returns their
    packed indices and the attention groups of those rows alone, each attending as its segment's
    last token; (None, groups) when that is every row (one token per segment, all wanted)."""
    if len(step.count) == int(step.count.sum()) and wanted.all():
        return None, groups
    last = (np.cumsum(step.count) - 1)[wanted]  # packed row of each wanted segment's last token
    tail = Step(step.slot[wanted], (step.first + step.count - 1)[wanted], np.ones(len(last), np.int64))
    return last, [(0, len(last), AttentionPlan.of(tail, cache))]


def attend(q: np.ndarray, i: int, cache: SlotCache, plan: AttentionPlan, scale: np.float32) -> np.ndarray:
    """Causal attention of the packed queries q (H, N, hd) over their sequence's prefix part
    and own keys. Returns (H, N, hd). The two blocks of keys share one softmax: one running
    maximum, one denominator; the value products are summed before normalising. Heads are
    taken a few at a time so each chunk's scores stay in L2 through the softmax passes.

    Grouped-query attention: the cache may hold fewer key/value heads (H_kv) than there are query
    heads; query head h reads kv head h // (H / H_kv). The g = H / H_kv query heads of one kv head
    are stacked as extra query rows, so each kv head's keys are multiplied once for all of them."""
    H, N, hd = q.shape
    S, Tq, Tk = plan.n_grid, plan.tq, plan.tk
    P = cache.prefix_k.shape[2]
    H_kv = cache.k.shape[1]
    g = H // H_kv
    qp = plan.pad(q)  # (H, S * Tq, hd)
    qp *= scale  # scaling q, not the scores: fewer passes; for head size 64 (1/8) the same bits
    k_own, v_own = plan.own(cache.k[i]), plan.own(cache.v[i])  # (H_kv, S, Tk, hd)
    kp, vp = cache.prefix_k[i], cache.prefix_v[i]  # (H_kv, P, hd)
    hidden = plan.hidden if plan.hidden is None or g == 1 else np.tile(plan.hidden, (1, g, 1))  # (S, g * Tq, .)
    out = np.empty((H, S * Tq, hd), np.float32)
    per_chunk = max(1, min(H_kv, _SCORES_PER_CHUNK // (S * g * Tq * (P + Tk))))
    for h in range(0, H_kv, per_chunk):
        hs = slice(h, h + per_chunk)  # kv heads
        n_h = len(range(H_kv)[hs])
        qs = slice(h * g, (h + n_h) * g)  # their query heads
        # (n_h, g, S, Tq, hd) -> (n_h, S, g * Tq, hd): a view when g is 1
        qg = qp[qs].reshape(n_h, g, S, Tq, hd).transpose(0, 2, 1, 3, 4).reshape(n_h, S, g * Tq, hd)
        s_own = np.matmul(qg, k_own[hs].swapaxes(-1, -2))  # (h, S, g * Tq, Tk)
        if hidden is not None:  # query at own index first+t sees own keys 0..first+t
            np.copyto(s_own[..., plan.hidden_from:], _NEG_INF, where=hidden)
        m = s_own.max(axis=-1, keepdims=True)
        if P:
            s_pre = np.matmul(qg.reshape(n_h, S * g * Tq, hd), kp[hs].swapaxes(-1, -2)).reshape(n_h, S, g * Tq, P)
            if plan.prefix_hidden is not None:  # a prompt that shares only part of the prefix
                np.copyto(s_pre, _NEG_INF, where=plan.prefix_hidden)
            np.maximum(m, s_pre.max(axis=-1, keepdims=True), out=m)
            s_pre -= m
            np.exp(s_pre, out=s_pre)
        s_own -= m
        np.exp(s_own, out=s_own)
        denom = s_own.sum(axis=-1, keepdims=True)
        o = out[qs].reshape(n_h, S, Tq, hd) if g == 1 else np.empty((n_h, S, g * Tq, hd), np.float32)
        np.matmul(s_own, v_own[hs], out=o)
        if P:
            denom += s_pre.sum(axis=-1, keepdims=True)
            o += np.matmul(s_pre.reshape(n_h, S * g * Tq, P), vp[hs]).reshape(n_h, S, g * Tq, hd)
        o /= denom
        if g > 1:
            out[qs] = o.reshape(n_h, S, g, Tq, hd).transpose(0, 2, 1, 3, 4).reshape(n_h * g, S * Tq, hd)
    return plan.unpad(out)
