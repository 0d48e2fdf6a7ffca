"""Where keys and values live while sequences are generated, and which entries a step fills.

A batch cache has one slot per sequence in flight and reads the program's prefix, shared by all,
in place; a call alone copies the prefix in front of its own keys instead (`SoloCache`), so each
layer attends over one contiguous block, as llama.cpp's KV cache does. Nothing here depends on
the model beyond its `KVShape`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KVShape:
    """What a model's keys and values of one position are: n_layer x n_head x head_dim each."""

    n_layer: int
    n_head: int  # key/value heads
    head_dim: int
    n_ctx: int

    @property
    def bytes_per_position(self) -> int:
        """Float32 keys and values of one position in every layer (74 KB for GPT-2 124M)."""
        return 2 * self.n_layer * self.n_head * self.head_dim * 4

    def empty_prefix(self) -> np.ndarray:
        return np.zeros((self.n_layer, self.n_head, 0, self.head_dim), np.float32)


@dataclass(frozen=True)
class Step:
    """Which tokens one evaluation step holds. Segment s continues slot `slot[s]` with `count[s]`
    tokens from its own index `first[s]`; the packed rows are the segments one after another."""

    slot: np.ndarray  # (S,)
    first: np.ndarray  # (S,)
    count: np.ndarray  # (S,)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(segment, offset in segment) of each packed row."""
        if len(self.count) == 1:
            return np.zeros(int(self.count[0]), np.int64), np.arange(int(self.count[0]))
        seg = np.repeat(np.arange(len(self.count)), self.count)
        offset = np.arange(len(seg)) - np.repeat(np.cumsum(self.count) - self.count, self.count)
        return seg, offset

    def positions(self, cache: "SlotCache") -> np.ndarray:
        """(N,) position in its sequence of each packed row."""
        seg, offset = self.rows()
        return cache.start[self.slot[seg]] + self.first[seg] + offset


class SlotCache:
    """Keys and values of the sequences' own tokens, one slot each, and the shared prefix they
    attend to. Slot b holds own indices from base[b]; own index t sits at position start[b] + t
    and also sees the first visible[b] prefix tokens."""

    def __init__(self, k: np.ndarray, v: np.ndarray, prefix_k: np.ndarray, prefix_v: np.ndarray,
                 prefix_inline: bool = False):
        self.k, self.v = k, v  # (n_layer, n_head, B, cap, head_dim)
        self.prefix_k, self.prefix_v = prefix_k, prefix_v  # (n_layer, n_head, P, head_dim)
        zero = np.zeros(k.shape[2], np.int64)
        self.start, self.base, self.visible = zero, zero.copy(), zero.copy()
        # The prefix's shared part is copied in front of each slot's own keys (SoloCache), not read in place.
        self.prefix_inline = prefix_inline

    @classmethod
    def slots(cls, shape: KVShape, capacity: int, n_positions: int, prefix_k: np.ndarray,
              prefix_v: np.ndarray) -> "SlotCache":
        """`capacity` slots of n_positions own positions for sequences to take turns in (see `assign`)."""
        dims = (shape.n_layer, shape.n_head, capacity, n_positions, shape.head_dim)
        # zeros, not empty: masked keys still meet a zero probability, and 0 * garbage may be NaN
        return cls(np.zeros(dims, np.float32), np.zeros(dims, np.float32), prefix_k, prefix_v)

    @property
    def n_slots(self) -> int:
        return self.k.shape[2]

    def assign(self, slot: int, start: int) -> None:
        """Give a slot to a sequence that shares the first `start` prefix tokens: its own tokens
        from own index 0 (after the copied prefix, when inline). What the slot held before stays
        in the buffers but past the new sequence's own positions, where attention never looks."""
        if self.prefix_inline:
            self.start[slot], self.base[slot], self.visible[slot] = 0, start, 0
        else:
            self.start[slot], self.base[slot], self.visible[slot] = start, 0, start

    def add_slots(self, n: int) -> None:
        """n more slots (a batch that sequences keep joining starts small and grows as they come)."""
        shape = list(self.k.shape)
        shape[2] += n
        for name in ("k", "v"):
            old, grown = getattr(self, name), np.zeros(shape, np.float32)
            grown[:, :, :old.shape[2]] = old
            setattr(self, name, grown)
        pad = np.zeros(n, np.int64)
        self.start, self.base, self.visible = (np.concatenate([a, pad]) for a in (self.start, self.base, self.visible))

    def reserve(self, n_positions: int) -> None:
        """Make room for own indices up to n_positions - 1 (doubling, so growth copies rarely)."""
        cap = self.k.shape[3]
        if n_positions <= cap:
            return
        shape = list(self.k.shape)
        shape[3] = max(n_positions, 2 * cap)
        for name in ("k", "v"):
            grown = np.zeros(shape, np.float32)
            grown[:, :, :, :cap] = getattr(self, name)
            setattr(self, name, grown)


class SoloCache:
    """The cache of one sequence alone: the prefix copied in front of the call's own keys. Kept
    across calls; only the positions a call overwrote are restored from the prefix. It grows by
    doubling to what calls use (NumPy backs big arrays with 2 MB huge pages, so a buffer for the
    whole context would be resident in full, 150 MB, however little of it a call touches)."""

    def __init__(self, shape: KVShape):
        self.shape = shape
        self.k = self.v = np.zeros((shape.n_layer, shape.n_head, 1, 0, shape.head_dim), np.float32)
        self.valid = 0  # leading positions that hold the prefix

    def cache_for(self, start: int, n_positions: int, prefix_k: np.ndarray, prefix_v: np.ndarray) -> SlotCache:
        """A one-slot cache for a sequence sharing the prefix's first `start` tokens that fills
        positions up to n_positions - 1."""
        cap = self.k.shape[3]
        if n_positions > cap:
            shape = list(self.k.shape)
            shape[3] = min(max(n_positions, 2 * cap), self.shape.n_ctx)
            self.k, self.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            self.valid = 0
        if self.valid < start:
            self.k[:, :, 0, self.valid:start] = prefix_k[:, :, self.valid:start]
            self.v[:, :, 0, self.valid:start] = prefix_v[:, :, self.valid:start]
        self.valid = start  # the call writes from here on
        empty = prefix_k[:, :, :0]
        return SlotCache(self.k, self.v, empty, empty, prefix_inline=True)
