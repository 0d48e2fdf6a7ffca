"""What float32 NumPy can do on this machine for GPT-2 124M, apart from paw_lite's engine.

    python benchmarks/numpy_limits.py [--json] [--repeats N]

Two measurements behind the performance notes (benchmarks/README.md), on random matrices of
GPT-2 124M's shapes (speed does not depend on the values):

1. The 48 block matrices and the head as products with n rows, the blocks in the forms the engine
   uses (the head as one product; the engine takes it in vocabulary blocks, a little faster at
   many rows), on one and on every BLAS thread: the cost of a token row as a function of how many rows share one
   pass over the weights. One row is a pass over 494 MB of float32 (memory-bound); a few dozen
   rows cost about as much as a pass of their own each way (the sgemm's fixed cost at small n).
2. The float16 -> float32 and int8 -> float32 casts NumPy offers, into a buffer that stays in L2:
   what reading 2- or 1-byte weights and widening them in NumPy would cost per token, against
   streaming the float32 weights. (No BLAS in NumPy multiplies float16, bfloat16 or int8.)

Takes about a minute."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from paw_lite.blas_threads import controller, usable_cpus
from paw_lite.products import SMALL_PRODUCT_ROWS  # below it, products run as w @ x.T

D, N_FF, N_LAYER, N_VOCAB = 768, 3072, 12, 50257
SHAPES = [(3 * D, D), (D, D), (N_FF, D), (D, N_FF)]  # attn_qkv, attn_output, ffn_up, ffn_down (Linear layout)
ROWS = (1, 2, 8, 16, 32, 37, 48, 64, 128, 256, 1024)


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def products(repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    layers = [[rng.standard_normal(s, dtype=np.float32) for s in SHAPES] for _ in range(N_LAYER)]
    head = rng.standard_normal((N_VOCAB, D), dtype=np.float32)
    flops_per_row = 2 * (N_LAYER * sum(a * b for a, b in SHAPES) + N_VOCAB * D)
    ctl = controller()
    threads = sorted({1, usable_cpus()}) if ctl is not None else [None]
    saved = ctl.get() if ctl is not None else None
    rows_out = []
    try:
        for n_threads in threads:
            if ctl is not None:
                ctl.set(n_threads)
            for n in ROWS:
                x = {k: rng.standard_normal((n, k), dtype=np.float32) for k in (D, N_FF)}

                def run():
                    for layer in layers:
                        for w in layer:
                            xs = x[w.shape[1]]
                            if n == 1:
                                np.matmul(w, xs[0])
                            elif n < SMALL_PRODUCT_ROWS:
                                np.matmul(w, xs.T)
                            else:
                                np.matmul(xs, w.T)
                    np.matmul(head, x[D][0]) if n == 1 else np.matmul(head, x[D].T)

                ms = _median_ms(run, repeats)
                rows_out.append({"threads": n_threads, "rows": n, "ms": round(ms, 2), "ms_per_row": round(ms / n, 3),
                                 "gflops": round(flops_per_row * n / ms / 1e6, 1)})
                print(f"  {n_threads} thread(s), {n:5d} rows: {ms:8.1f} ms, {ms / n:7.2f} ms/row, "
                      f"{flops_per_row * n / ms / 1e6:6.1f} GFLOP/s", file=sys.stderr)
    finally:
        if ctl is not None:
            ctl.set(saved)
    return rows_out


def casts(repeats: int) -> dict:
    n = 128 * 1024  # 512 KB of float32: stays in L2
    out = np.empty(n, np.float32)
    result = {}
    params = N_LAYER * sum(a * b for a, b in SHAPES) + N_VOCAB * D
    for name, src in (("float16", np.ones(n, np.float16)), ("int8", np.ones(n, np.int8))):
        ms = _median_ms(lambda: [np.copyto(out, src, casting="unsafe") for _ in range(100)], repeats) / 100
        rate = n / ms / 1e6  # elements per ns
        result[name] = {"gelem_per_s": round(rate, 2), "ms_per_token_one_core": round(params / rate / 1e6, 1)}
        print(f"  {name} -> float32: {rate:.2f} G elements/s; widening every weight once per token: "
              f"{params / rate / 1e6:.0f} ms on one core", file=sys.stderr)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    args = ap.parse_args()
    print("products of n token rows through the 48 matrices and the head (float32):", file=sys.stderr)
    report = {"numpy": np.__version__, "cpus": usable_cpus(), "products": products(args.repeats)}
    print("casts into an L2-resident float32 buffer:", file=sys.stderr)
    report["casts"] = casts(args.repeats)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
