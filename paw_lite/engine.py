"""The fast GPT-2 path the runtime uses: weights kept in the GGUF layout with the LoRA merged in, a
program's prefix evaluated once and shared by every call, and ragged batches of sequences evaluated
together.

`gpt2.py` holds the plain reference forward pass; tests hold this module to it. Every op is
float32. One sequence attends over one contiguous cache (the prefix copied in front), as the
reference does; a batch keeps one copy of the prefix and attends over it and each sequence's own
keys as two blocks under one softmax. The matmul shapes differ from the reference, so logits
agree to ~5e-6, not bit for bit (tests/test_batch_map.py states the measured figures).

Memory-wise a call is bound by streaming the float32 weights (~500 MB for GPT-2 124M) once per
generated token; many sequences share that stream in `generate`, which is where NumPy wins."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .gpt2 import GELU_C, SQRT_2_OVER_PI
from .gpt2_layout import LORA_MODULES, GPT2Config

# Tokens evaluated in one prefill step across all sequences: bounds the activation buffers
# (MAX_ROWS x n_ff floats) while keeping the matmuls large enough to run at full speed.
MAX_ROWS = 2048
# Query tokens of one sequence per step: bounds the attention score buffer (heads x CHUNK x context).
PREFILL_CHUNK = 512
_KV_GROWTH = 64  # own positions reserved past the longest prompt before the KV buffers grow


class Stopped(Exception):
    """`Engine.generate` was asked to stop (another worker failed or was interrupted)."""


@dataclass(frozen=True)
class Layer:
    """One block. Matrices keep the GGUF Linear layout (d_out, d_in), C-contiguous, LoRA merged in:
    `_project` picks the product form that runs fastest for the number of rows."""

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
    # (n_vocab, d): logits are products of head row blocks with the hidden rows (Engine._head_blocks),
    # which read it in stored order.
    head: np.ndarray
    token_embd: np.ndarray | None  # (n_vocab, d), only when the head is not tied to the embedding
    position_embd: np.ndarray  # (n_ctx, d)
    output_norm_w: np.ndarray
    output_norm_b: np.ndarray
    layers: tuple[Layer, ...]

    @classmethod
    def from_gguf_names(cls, weights: dict[str, np.ndarray], config: GPT2Config,
                        lora: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, lora_scale: float = 1.0,
                        consume: bool = False) -> "Weights":
        """GGUF-named Linear-layout weights (W is (d_out, d_in)) with the LoRA pairs merged:
        W + scale * B @ A, each element the same float32 sum the reference merge computes.
        With consume, entries are popped from `weights` and merged in their own memory, so the
        float32 model is never held twice; without it, matrices no LoRA targets are shared."""
        get = weights.pop if consume else weights.__getitem__
        lora = lora or {}
        unknown = set(lora) - {f"blk.{i}.{m}" for i in range(config.n_layer) for m in LORA_MODULES}
        assert not unknown, f"LoRA targets outside the model: {sorted(unknown)}"  # validated on load
        scale = np.float32(lora_scale)

        # alpha / r is a power of two for PAW programs (16 / 64): scaling B before the product then
        # gives the same bits as scaling B @ A after it, and saves a pass over every matrix.
        scale_first = float(np.frexp(scale)[0]) == 0.5

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
            a, b = pair
            delta = product[:w.size].reshape(w.shape)
            if scale_first:  # (d_out, r) @ (r, d_in), as lora.py
                np.matmul(scale * b, a, out=delta)
            else:
                np.matmul(b, a, out=delta)
                delta *= scale
            if consume and w.flags.writeable:  # this function's own copy: merged where it lies
                w += delta
                return w
            return w + delta

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


# Below this many rows a projection runs as w @ x.T into a (d_out, N) scratch that is then copied
# back transposed: OpenBLAS handles the weight better as the first operand at few rows. Measured
# on GPT-2 124M's 48 matrices: one thread, 64 rows 89 against 81 GFLOP/s; two threads, 37 rows
# 91 against 84. From 128 rows both forms run alike and x @ w.T needs no copy.
_SMALL_PRODUCT_ROWS = 96


def _project(x: np.ndarray, w: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """out = x @ w.T for rows x (N, d_in) and a Linear-layout w (d_out, d_in); scratch holds at
    least d_out * min(N, _SMALL_PRODUCT_ROWS) floats."""
    n = len(x)
    if n == 1:  # a matrix-vector product
        np.matmul(w, x[0], out=out[0])
    elif n < _SMALL_PRODUCT_ROWS:
        product = scratch[:w.shape[0] * n].reshape(w.shape[0], n)
        np.matmul(w, x.T, out=product)
        np.copyto(out, product.T)
    else:
        np.matmul(x, w.T, out=out)
    return out


@dataclass(frozen=True)
class Sequence:
    """One prompt to continue: `ids` are its tokens after the first `start` tokens of the shared
    prefix (the prompt is prefix[:start] + ids), `limit` the most tokens to generate (>= 1)."""

    ids: list[int]
    start: int
    limit: int


class _Batch:
    """Keys and values of the sequences' own tokens, one slot each, and the shared prefix they
    attend to. Slot b holds own indices from base[b]; own index t sits at position start[b] + t
    and also sees the first visible[b] prefix tokens."""

    def __init__(self, k: np.ndarray, v: np.ndarray, start: np.ndarray, base: np.ndarray,
                 prefix_k: np.ndarray, prefix_v: np.ndarray, visible: np.ndarray):
        self.k, self.v = k, v  # (n_layer, n_head, B, cap, head_dim)
        self.start, self.base, self.visible = start, base, visible
        self.prefix_k, self.prefix_v = prefix_k, prefix_v  # (n_layer, n_head, P, head_dim)

    @classmethod
    def split(cls, config: GPT2Config, seqs: list[Sequence], prefix_k: np.ndarray, prefix_v: np.ndarray) -> "_Batch":
        """Slot b for sequence b; the prefix is shared, read in place."""
        batch = cls.slots(config, seqs, len(seqs), prefix_k, prefix_v)
        for b, seq in enumerate(seqs):
            batch.assign(b, seq)
        return batch

    @classmethod
    def slots(cls, config: GPT2Config, seqs: list[Sequence], capacity: int, prefix_k: np.ndarray,
              prefix_v: np.ndarray) -> "_Batch":
        """`capacity` slots for the sequences to take turns in (see `assign`)."""
        shape = (config.n_layer, config.n_head, capacity, own_positions(seqs), config.head_dim)
        # zeros, not empty: masked keys still meet a zero probability, and 0 * garbage may be NaN
        zero = np.zeros(capacity, np.int64)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32), zero, zero.copy(), prefix_k, prefix_v,
                   zero.copy())

    def assign(self, slot: int, seq: Sequence) -> None:
        """Give a slot to a sequence: its own tokens from index 0, after the prefix part it shares.
        What the slot held before stays in the buffers but past the new sequence's own positions,
        where attention never looks."""
        self.start[slot], self.base[slot], self.visible[slot] = seq.start, 0, seq.start

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


def own_positions(seqs: list[Sequence]) -> int:
    """Own positions per slot a batch's key and value buffers start with: room for the prompts and
    a first stretch of output, grown on demand (`_Batch.reserve`), so a batch run "until EOS or the
    context end" does not reserve the whole context for every sequence."""
    need = max(len(s.ids) + s.limit - 1 for s in seqs)  # the last generated token is never evaluated
    return min(need, max(len(s.ids) for s in seqs) + _KV_GROWTH)


def kv_bytes_per_position(config: GPT2Config) -> int:
    """Float32 keys and values of one position in every layer (74 KB for GPT-2 124M)."""
    return 2 * config.n_layer * config.n_embd * 4


class _Solo:
    """The batch of one: the prefix copied in front of the call's own keys, so each layer attends
    over one contiguous block (one matmul, one softmax), as llama.cpp's KV cache does. Kept across
    calls; only the positions a call overwrote are restored from the prefix. It grows by doubling
    to what calls use (NumPy backs big arrays with 2 MB huge pages, so a buffer for the whole
    context would be resident in full, 150 MB, however little of it a call touches)."""

    def __init__(self, config: GPT2Config):
        self.config = config
        self.k = self.v = np.zeros((config.n_layer, config.n_head, 1, 0, config.head_dim), np.float32)
        self.valid = 0  # leading positions that hold the prefix

    def batch_for(self, seq: Sequence, prefix_k: np.ndarray, prefix_v: np.ndarray) -> _Batch:
        need = seq.start + len(seq.ids) + seq.limit - 1  # the last generated token is never evaluated
        cap = self.k.shape[3]
        if need > cap:
            shape = list(self.k.shape)
            shape[3] = min(max(need, 2 * cap), self.config.n_ctx)
            self.k, self.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            self.valid = 0
        if self.valid < seq.start:
            self.k[:, :, 0, self.valid:seq.start] = prefix_k[:, :, self.valid:seq.start]
            self.v[:, :, 0, self.valid:seq.start] = prefix_v[:, :, self.valid:seq.start]
        self.valid = seq.start  # the call writes from here on
        empty = prefix_k[:, :, :0]
        zero = np.zeros(1, np.int64)
        return _Batch(self.k, self.v, zero, np.array([seq.start]), empty, empty, zero)


@dataclass(frozen=True)
class _Step:
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


class Engine:
    """Evaluates a GPT-2 over one shared prefix plus, per sequence, its own tokens."""

    def __init__(self, weights: Weights, config: GPT2Config):
        self.w = weights
        self.config = config
        empty = np.zeros((config.n_layer, config.n_head, 0, config.head_dim), np.float32)
        self.prefix_k, self.prefix_v = empty, empty
        self._scale = np.float32(1.0 / np.sqrt(config.head_dim))
        self._ws: _Workspace | None = None
        self._solo: _Solo | None = None

    def fork(self) -> "Engine":
        """An engine over the same weights and prefix with its own buffers, for another thread."""
        twin = Engine(self.w, self.config)
        twin.set_prefix(self.prefix_k, self.prefix_v)
        return twin

    # -- prefix -------------------------------------------------------------------------------

    def set_prefix(self, k: np.ndarray, v: np.ndarray) -> None:
        """Keys and values of the shared prefix: (n_layer, n_head, P, head_dim) each."""
        self.prefix_k, self.prefix_v = k, v
        self._solo = None

    def eval_prefix(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate a prefix from scratch (no logits needed) and return its keys and values."""
        empty = self.prefix_k[:, :, :0]
        if not ids:
            return empty.copy(), empty.copy()
        batch = _Batch.split(self.config, [Sequence(ids, 0, 1)], empty, empty)
        for first in range(0, len(ids), PREFILL_CHUNK):
            n = min(PREFILL_CHUNK, len(ids) - first)
            self._step(batch, _Step(np.array([0]), np.array([first]), np.array([n])), np.asarray(ids[first:first + n]),
                       np.zeros(1, bool))
        return batch.k[:, :, 0].copy(), batch.v[:, :, 0].copy()

    # -- generation ---------------------------------------------------------------------------

    def generate(self, seqs: list[Sequence], eos: int, capacity: int | None = None,
                 on_tokens: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None,
                 on_done: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
        """Greedy continuations of every sequence, each stopping at EOS or its limit; on_tokens is
        called after each step that made tokens, with how many it made (for progress), and
        on_done(i, ids) as sequence i finishes. Once `stop` is set, the next step raises Stopped
        instead of running.

        Up to `capacity` sequences (all by default) are in flight, each in a slot of the batch's
        cache. A finished sequence's slot goes to the next waiting one, and every step evaluates
        one token of each decoding sequence together with prompt tokens of newly admitted ones:
        when outputs end at different steps, the slots stay full and the matmuls large."""
        return self._run(seqs, eos, capacity, on_tokens=on_tokens, stop=stop, on_done=on_done)

    def prompt_logits(self, seqs: list[Sequence]) -> np.ndarray:
        """Logits after the last token of each sequence (n_seqs, n_vocab): what generation
        chooses each one's first token from, evaluated the way generation evaluates them."""
        logits = np.empty((len(seqs), self.config.n_vocab), np.float32)
        self._run([replace(s, limit=1) for s in seqs], -1, None, first_logits=logits)
        return logits

    def _run(self, seqs: list[Sequence], eos: int, capacity: int | None,
             first_logits: np.ndarray | None = None, on_tokens: Callable[[int], None] | None = None,
             stop: threading.Event | None = None,
             on_done: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
        """`generate`; with first_logits, also the logits each sequence's first token came from."""
        if not seqs:
            return []
        P = self.prefix_k.shape[2]
        assert all(s.limit >= 1 and s.ids and s.start <= P and s.start + len(s.ids) + s.limit - 1 <= self.config.n_ctx
                   for s in seqs)
        capacity = max(1, min(capacity or len(seqs), len(seqs)))
        solo = len(seqs) == 1
        batch = self._solo_batch(seqs[0]) if solo else _Batch.slots(self.config, seqs, capacity, self.prefix_k, self.prefix_v)
        outs: list[list[int]] = [[] for _ in seqs]
        waiting = deque(range(len(seqs)))
        free = deque(range(capacity))
        slot_of: dict[int, int] = {}
        fed: dict[int, int] = {}  # prompt tokens evaluated, per admitted sequence still in its prompt
        decoding: dict[int, tuple[int, int]] = {}  # sequence -> (next token to evaluate, its own index)
        while waiting or fed or decoding:
            if stop is not None and stop.is_set():
                raise Stopped
            while waiting and free:
                i = waiting.popleft()
                slot_of[i] = free.popleft()
                fed[i] = 0
                if not solo:
                    batch.assign(slot_of[i], seqs[i])
            # Decoding sequences first: one-token segments form one attention group.
            segments = [(i, slot_of[i], index, [token]) for i, (token, index) in decoding.items()]
            rows = len(segments)
            total = rows + sum(len(seqs[i].ids) - done for i, done in fed.items())
            budget = -(-total // -(-total // MAX_ROWS))  # even steps: 2368 rows go as 2 x 1184, not 2048 + 320
            for i, done in fed.items():
                n = min(PREFILL_CHUNK, len(seqs[i].ids) - done, budget - rows)
                if n <= 0:
                    break
                segments.append((i, slot_of[i], int(batch.base[slot_of[i]]) + done, seqs[i].ids[done:done + n]))
                rows += n
            step = _Step(np.array([sg[1] for sg in segments]), np.array([sg[2] for sg in segments]),
                         np.array([len(sg[3]) for sg in segments]))
            wants = np.array([i not in fed or fed[i] + len(ids) == len(seqs[i].ids) for i, _, _, ids in segments])
            batch.reserve(int((step.first + step.count).max()))
            h = self._step(batch, step, np.concatenate([sg[3] for sg in segments]), wants)
            if h is None:
                logits, picks = None, []
            elif first_logits is None:
                logits, picks = None, self._greedy(h)
            else:
                logits = self._logits(h)
                picks = np.argmax(logits, axis=1).tolist()
            row = made = 0  # logits row of the next segment that wants one; tokens this step made
            for (i, slot, first, ids), want in zip(segments, wants):
                if not want:
                    fed[i] += len(ids)
                    continue
                if fed.pop(i, None) is not None and first_logits is not None:
                    first_logits[i] = logits[row]
                token = picks[row]
                row += 1
                if token != eos:
                    outs[i].append(token)
                    made += 1
                if token == eos or len(outs[i]) >= seqs[i].limit:
                    decoding.pop(i, None)
                    free.append(slot)
                    if on_done is not None:
                        on_done(i, outs[i])
                else:
                    decoding[i] = (token, first + len(ids))
            if made and on_tokens is not None:
                on_tokens(made)
        return outs

    def _solo_batch(self, seq: Sequence) -> _Batch:
        if self._solo is None:
            self._solo = _Solo(self.config)
        return self._solo.batch_for(seq, self.prefix_k, self.prefix_v)

    # -- one evaluation step ------------------------------------------------------------------

    def _step(self, batch: _Batch, step: _Step, tokens: np.ndarray, wanted: np.ndarray) -> np.ndarray | None:
        """Evaluate the step's tokens through every layer (writing their keys and values to the
        batch) and return the final normalised hidden rows (S', d) after the last token of each
        segment `wanted` (bool per segment) selects, or None when it selects none."""
        c, w = self.config, self.w
        seg, offset = step.rows()
        positions = batch.start[step.slot[seg]] + step.first[seg] + offset
        ws = self._workspace(len(tokens))
        x = ws.x[:len(tokens)]
        np.add(w.embed(tokens), w.position_embd[positions], out=x)  # (N, d)
        groups = _attention_groups(step, batch)
        *inner, final = w.layers
        for i, layer in enumerate(inner):
            q = self._attention_input(x, i, layer, batch, groups, ws)
            self._block_rest(x, q, i, layer, batch, groups, ws)
        # The last block's outputs feed nothing but the logits: every row's keys and values are
        # stored, the rest of the block runs only on the rows whose logits are wanted.
        last = np.cumsum(step.count) - 1  # packed row of each segment's last token
        q = self._attention_input(x, c.n_layer - 1, final, batch, groups, ws)
        if not wanted.any():
            return None
        if len(last) == len(x) and wanted.all():  # one token per segment: every row is wanted
            rows = x
            self._block_rest(rows, q, c.n_layer - 1, final, batch, groups, ws)
        else:
            last = last[wanted]
            tail = _Step(step.slot[wanted], (step.first + step.count - 1)[wanted], np.ones(len(last), np.int64))
            rows = x[last]  # (S', d), a copy
            self._block_rest(rows, np.ascontiguousarray(q[:, last]), c.n_layer - 1, final, batch,
                             [(0, len(last), _AttentionPlan.of(tail, batch))], ws)
        return _layer_norm(rows, w.output_norm_w, w.output_norm_b, c.eps, ws.att[:len(rows)], ws.sq[:len(rows)])

    # -- the head: logits, or only their argmax -----------------------------------------------

    def _logits(self, h: np.ndarray) -> np.ndarray:
        """Logits (S, n_vocab) of the final hidden rows h (S, d), a view into the workspace."""
        logits = self._workspace(len(h)).logits_rows(len(h))
        if len(h) == 1:  # a matrix-vector product reads the head faster than a 1-row matmul
            np.matmul(self.w.head, h[0], out=logits[0])
            return logits
        for start, block in self._head_blocks(h):
            logits[:, start:start + len(block)] = block.T
        return logits

    def _greedy(self, h: np.ndarray) -> list[int]:
        """argmax of `_logits(h)` per row (the same products, the same first-maximum ties),
        without writing the (S, n_vocab) logits out: a running maximum over vocabulary blocks."""
        if len(h) == 1:
            return [int(np.argmax(self._logits(h)[0]))]
        cols = np.arange(len(h))
        best = np.full(len(h), -np.inf, np.float32)
        pick = np.zeros(len(h), np.int64)
        for start, block in self._head_blocks(h):
            top = np.argmax(block, axis=0)
            value = block[top, cols]
            better = value > best  # strictly: an earlier block keeps a tie, as np.argmax does
            best[better] = value[better]
            pick[better] = top[better] + start
        return pick.tolist()

    def _head_blocks(self, h: np.ndarray):
        """(first vocabulary id, head[block] @ h.T) over blocks of the vocabulary. Measured on
        GPT-2 124M at 64 rows, one thread: 73 ms against 92 ms for one `h @ head.T`, because the
        head rows are read in their stored order and each (block, rows) product stays in L2."""
        n = max(_HEAD_MIN_BLOCK, min(_HEAD_MAX_BLOCK, _HEAD_BLOCK_FLOATS // len(h)))
        buf = self._workspace(len(h)).head_block(n, len(h))
        hT = h.T
        for start in range(0, self.w.head.shape[0], n):
            rows = self.w.head[start:start + n]
            out = buf[:len(rows)]
            np.matmul(rows, hT, out=out)
            yield start, out

    def _workspace(self, n_rows: int) -> "_Workspace":
        ws = self._ws
        if ws is None or ws.x.shape[0] < n_rows:
            ws = self._ws = _Workspace(self.config, max(n_rows, 1))
        return ws

    def _attention_input(self, x: np.ndarray, i: int, layer: Layer, batch: _Batch, groups: "_Groups",
                         ws: "_Workspace") -> np.ndarray:
        """The first half of a block over the packed rows x (N, d): normalise, project, store the
        keys and values in the cache; returns the queries (H, N, hd), a view into the workspace."""
        c = self.config
        N, d = x.shape
        H, hd = c.n_head, c.head_dim
        h, qkv = ws.h[:N], ws.qkv[:N]
        _layer_norm(x, layer.attn_norm_w, layer.attn_norm_b, c.eps, h, ws.sq[:N])
        _project(h, layer.attn_qkv, qkv, ws.product)
        qkv += layer.attn_qkv_b  # (N, 3d)
        q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(N, H, hd).transpose(1, 0, 2) for j in range(3))  # (H, N, hd)
        for r0, r1, plan in groups:
            plan.store(batch.k[i], k[:, r0:r1])
            plan.store(batch.v[i], v[:, r0:r1])
        return q

    def _block_rest(self, x: np.ndarray, q: np.ndarray, i: int, layer: Layer, batch: _Batch, groups: "_Groups",
                    ws: "_Workspace") -> None:
        """The rest of the block for the rows x (N, d) and their queries q (H, N, hd), in place."""
        c = self.config
        N, d = x.shape
        H, hd = c.n_head, c.head_dim
        h, att, up, sq = ws.h[:N], ws.att[:N], ws.up[:N], ws.sq[:N]
        for r0, r1, plan in groups:
            a = self._attention(q[:, r0:r1], i, batch, plan)  # (H, n, hd)
            np.copyto(att[r0:r1].reshape(r1 - r0, H, hd), a.transpose(1, 0, 2))
        _project(att, layer.attn_output, h, ws.product)
        h += layer.attn_output_b
        x += h
        _layer_norm(x, layer.ffn_norm_w, layer.ffn_norm_b, c.eps, h, sq)
        _project(h, layer.ffn_up, up, ws.product)
        up += layer.ffn_up_b
        _gelu_inplace(up, ws.tmp)  # (N, n_ff)
        _project(up, layer.ffn_down, h, ws.product)
        h += layer.ffn_down_b
        x += h

    def _attention(self, q: np.ndarray, i: int, batch: _Batch, plan: "_AttentionPlan") -> np.ndarray:
        """Causal attention of the packed queries q (H, N, hd) over their sequence's prefix part
        and own keys. Returns (H, N, hd). The two blocks of keys share one softmax: one running
        maximum, one denominator; the value products are summed before normalising. Heads are
        taken a few at a time so each chunk's scores stay in L2 through the softmax passes."""
        H, N, hd = q.shape
        S, Tq, Tk = plan.n_grid, plan.tq, plan.tk
        P = batch.prefix_k.shape[2]
        qp = plan.pad(q)  # (H, S * Tq, hd)
        qp *= self._scale  # scaling q, not the scores: fewer passes; for head size 64 (1/8) the same bits
        k_own, v_own = plan.own(batch.k[i]), plan.own(batch.v[i])  # (H, S, Tk, hd)
        kp, vp = batch.prefix_k[i], batch.prefix_v[i]  # (H, P, hd)
        out = np.empty((H, S * Tq, hd), np.float32)
        per_chunk = max(1, min(H, _SCORES_PER_CHUNK // (S * Tq * (P + Tk))))
        for h in range(0, H, per_chunk):
            hs = slice(h, h + per_chunk)
            n_h = len(range(H)[hs])
            s_own = np.matmul(qp[hs].reshape(n_h, S, Tq, hd), k_own[hs].swapaxes(-1, -2))  # (h, S, Tq, Tk)
            if plan.hidden is not None:  # query at own index first+t sees own keys 0..first+t
                np.copyto(s_own[..., plan.hidden_from:], _NEG_INF, where=plan.hidden)
            m = s_own.max(axis=-1, keepdims=True)
            if P:
                s_pre = np.matmul(qp[hs], kp[hs].swapaxes(-1, -2)).reshape(n_h, S, Tq, P)
                if plan.prefix_hidden is not None:  # a prompt that shares only part of the prefix
                    np.copyto(s_pre, _NEG_INF, where=plan.prefix_hidden)
                np.maximum(m, s_pre.max(axis=-1, keepdims=True), out=m)
                s_pre -= m
                np.exp(s_pre, out=s_pre)
            s_own -= m
            np.exp(s_own, out=s_own)
            denom = s_own.sum(axis=-1, keepdims=True)
            o = out[hs].reshape(n_h, S, Tq, hd)
            np.matmul(s_own, v_own[hs], out=o)
            if P:
                denom += s_pre.sum(axis=-1, keepdims=True)
                o += np.matmul(s_pre.reshape(n_h, S * Tq, P), vp[hs]).reshape(n_h, S, Tq, hd)
            o /= denom
        return plan.unpad(out)


_NEG_INF = np.float32(-np.inf)
_SCORES_PER_CHUNK = 256 * 1024  # attention scores per head chunk: 1 MB of float32, half of L2
_GELU_ROWS = 64  # rows per GELU pass: (64, n_ff) float32 stays in L2 across its eight passes
# Vocabulary rows per head block: a (block, rows) float32 product of at most 1 MB, half of L2.
_HEAD_BLOCK_FLOATS = 256 * 1024
_HEAD_MIN_BLOCK, _HEAD_MAX_BLOCK = 256, 4096


@dataclass(frozen=True)
class _AttentionPlan:
    """How a group of segments maps onto the padded (slot, query) grid attention works on. The
    grid's slots are the segments' own, or, for one query per segment on scattered slots, the
    whole slot range they span (zero queries for the others): reading a range of the cache is a
    view, gathering scattered slots would copy every live sequence's keys at every layer."""

    grid_slots: np.ndarray  # (G,) batch slot of each grid entry
    tq: int  # queries per grid entry (padded)
    tk: int  # own keys any segment can see
    flat: np.ndarray | None  # grid index of each packed row; None when the rows fill the grid
    rows_slot: np.ndarray  # (N,) batch slot of each packed row
    rows_index: np.ndarray  # (N,) own index of each packed row
    block: tuple[slice, slice] | None  # (slots, own indices) when the rows fill a rectangle of the cache
    hidden: np.ndarray | None  # (G, Tq, Tk - hidden_from) True where a key is in a query's future
    hidden_from: int  # keys before this own index are visible to every query (a call's cached prefix)
    prefix_hidden: np.ndarray | None  # (G, 1, P) True for prefix keys a sequence does not share
    consecutive: bool  # the grid's slots are consecutive: their caches are one view

    @classmethod
    def of(cls, step: _Step, batch: _Batch) -> "_AttentionPlan":
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
        P = batch.prefix_k.shape[2]
        shared = np.full(G, P, np.int64)
        shared[grid] = batch.visible[step.slot]
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


_Groups = list[tuple[int, int, _AttentionPlan]]  # (first packed row, end row, plan) of each attention group


def _attention_groups(step: _Step, batch: _Batch) -> _Groups:
    """(first row, end row, plan) per run of segments: one-token segments (decoding) and longer
    ones (prompts) are planned apart, so the short ones are not padded to the prompts' length."""
    single = step.count == 1
    cuts = [0, *(np.flatnonzero(single[1:] != single[:-1]) + 1).tolist(), len(single)]
    row = np.concatenate([[0], np.cumsum(step.count)])
    return [(int(row[a]), int(row[b]), _AttentionPlan.of(_Step(step.slot[a:b], step.first[a:b], step.count[a:b]), batch))
            for a, b in zip(cuts, cuts[1:])]


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
        self.product = np.empty(max(3 * d, config.n_ff) * min(n_rows, _SMALL_PRODUCT_ROWS), np.float32)
        self._logits = np.empty((0, config.n_vocab), np.float32)
        self._head_block = np.empty(0, np.float32)

    def logits_rows(self, n: int) -> np.ndarray:
        if self._logits.shape[0] < n:
            self._logits = np.empty((n, self._logits.shape[1]), np.float32)
        return self._logits[:n]

    def head_block(self, n_vocab_rows: int, n_rows: int) -> np.ndarray:
        """A (n_vocab_rows, n_rows) buffer for one block of head products."""
        if self._head_block.size < n_vocab_rows * n_rows:
            self._head_block = np.empty(n_vocab_rows * n_rows, np.float32)
        return self._head_block[:n_vocab_rows * n_rows].reshape(n_vocab_rows, n_rows)


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float, out: np.ndarray, sq: np.ndarray) -> np.ndarray:
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


def _gelu_inplace(x: np.ndarray, tmp: np.ndarray) -> None:
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
