"""The matrix products of a forward pass in the forms that run fastest on NumPy's float32 BLAS: a
Linear layer over packed rows (`project`) and the vocabulary head (`Head`: logits, or only their
argmax). Model-independent: matrices in the Linear layout (d_out, d_in), rows (N, d_in)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Below this many rows a projection runs as w @ x.T into a (d_out, N) scratch that is then copied
# back transposed: OpenBLAS handles the weight better as the first operand at few rows. Measured
# on 2 cores (AMD EPYC, OpenBLAS of numpy 2), GFLOP/s of w @ x.T (copy included) against x @ w.T,
# one thread: GPT-2 124M's 4 matrix shapes, 64 rows 89 / 73, 128 rows 91 / 82, 200 rows 92 / 94;
# Qwen3-0.6B's, 96 rows 87 / 75, 160 rows 91 / 84, 256 rows 91 / 91; two threads at once on
# Qwen3's, 128 rows 78 / 75, 160 rows 82 / 54. From ~200 rows x @ w.T runs as fast with no copy.
SMALL_PRODUCT_ROWS = 192

# Vocabulary rows per head block: a (block, rows) float32 product of at most 1 MB, half of L2.
_HEAD_BLOCK_FLOATS = 256 * 1024
_HEAD_MIN_BLOCK, _HEAD_MAX_BLOCK = 256, 4096
# A constrained pick gathers its allowed head rows when they are at most 1/8 of the vocabulary.
# Measured for one row on GPT-2's head (50,257 x 768, busy 2-core host): 256 ids 0.04 ms, 2,048
# 0.4 ms, 6,282 (1/8) 3.4 ms, 12,000 12.8 ms, against 7-9 ms for the whole head then indexed.
_FEW_IDS_SHARE = 8


def project(x: np.ndarray, w: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """out = x @ w.T for rows x (N, d_in) and a Linear-layout w (d_out, d_in); scratch holds at
    least d_out * min(N, SMALL_PRODUCT_ROWS) floats."""
    n = len(x)
    if n == 1:  # a matrix-vector product
        np.matmul(w, x[0], out=out[0])
    elif n < SMALL_PRODUCT_ROWS:
        product = scratch[:w.shape[0] * n].reshape(w.shape[0], n)
        np.matmul(w, x.T, out=product)
        np.copyto(out, product.T)
    else:
        np.matmul(x, w.T, out=out)
    return out


class Head:
    """The vocabulary head (n_vocab, d) over final hidden rows h (S, d), with buffers of its own
    (one Head per thread)."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = matrix
        self._logits = np.empty((0, matrix.shape[0]), np.float32)
        self._block = np.empty(0, np.float32)

    def logits(self, h: np.ndarray) -> np.ndarray:
        """Logits (S, n_vocab), a view into this head's buffer."""
        if self._logits.shape[0] < len(h):
            self._logits = np.empty((len(h), self.matrix.shape[0]), np.float32)
        logits = self._logits[:len(h)]
        if len(h) == 1:  # a matrix-vector product reads the head faster than a 1-row matmul
            np.matmul(self.matrix, h[0], out=logits[0])
            return logits
        for start, block in self._blocks(h):
            logits[:, start:start + len(block)] = block.T
        return logits

    def greedy(self, h: np.ndarray) -> list[int]:
        """argmax of `logits(h)` per row (the same products, the same first-maximum ties),
        without writing the (S, n_vocab) logits out: a running maximum over vocabulary blocks."""
        if len(h) == 1:
            return [int(np.argmax(self.logits(h)[0]))]
        cols = np.arange(len(h))
        best = np.full(len(h), -np.inf, np.float32)
        pick = np.zeros(len(h), np.int64)
        for start, block in self._blocks(h):
            top = np.argmax(block, axis=0)
            value = block[top, cols]
            better = value > best  # strictly: an earlier block keeps a tie, as np.argmax does
            best[better] = value[better]
            pick[better] = top[better] + start
        return pick.tolist()

    def greedy_among(self, h: np.ndarray, allowed: list[np.ndarray | None]) -> list[int]:
        """The argmax per row among the ids allowed[row] (sorted, so a tie goes to the lowest id,
        as np.argmax over masked logits; None: every id). A row allowed a few ids multiplies
        only their head rows: a label's 4 tokens instead of 50,257."""
        free = [r for r, ids in enumerate(allowed) if ids is None]
        picks = [0] * len(h)
        if free:
            for r, token in zip(free, self.greedy(h[free])):
                picks[r] = token
        for r, ids in enumerate(allowed):
            if ids is None:
                continue
            if len(ids) * _FEW_IDS_SHARE <= len(self.matrix):
                scores = self.matrix[ids] @ h[r]
            else:  # most of the vocabulary: the whole row, read in stored order, then masked
                scores = self.logits(h[r:r + 1])[0][ids]
            picks[r] = int(ids[int(np.argmax(scores))])
        return picks

    def _blocks(self, h: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(first vocabulary id, head[block] @ h.T) over blocks of the vocabulary. Measured on
        GPT-2 124M at 64 rows, one thread: 73 ms against 92 ms for one `h @ head.T`, because the
        head rows are read in their stored order and each (block, rows) product stays in L2."""
        n = max(_HEAD_MIN_BLOCK, min(_HEAD_MAX_BLOCK, _HEAD_BLOCK_FLOATS // len(h)))
        if self._block.size < n * len(h):
            self._block = np.empty(n * len(h), np.float32)
        buf = self._block[:n * len(h)].reshape(n, len(h))
        hT = h.T
        for start in range(0, self.matrix.shape[0], n):
            rows = self.matrix[start:start + n]
            out = buf[:len(rows)]
            np.matmul(rows, hT, out=out)
            yield start, out


class HeadPicks:
    """The scheduler's logits and picks of a model's final hidden rows, through its `head` (a
    `Head`): the same for every model family."""

    head: Head

    def logits(self, h: np.ndarray) -> np.ndarray:
        """Logits (S, n_vocab) of final hidden rows h (S, d), a view into the head's buffer."""
        return self.head.logits(h)

    def greedy(self, h: np.ndarray) -> list[int]:
        """The argmax of `logits(h)` per row, without writing the logits out."""
        return self.head.greedy(h)

    def greedy_among(self, h: np.ndarray, allowed: list[np.ndarray | None]) -> list[int]:
        """The argmax per row among the ids allowed[row] (None: all), computing few-id rows only."""
        return self.head.greedy_among(h, allowed)
