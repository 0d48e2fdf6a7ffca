"""paw_lite.dask on a LocalCluster against a local `fn.map`, on the full-size random GPT-2 program.

    python benchmarks/dask_bench.py [--json] [--quick] [--inputs N] [--partition-size N]

The files are those of benchmarks/interpreter_bench.py (generated once into benchmarks/.cache/
interpreter): a full-size random GPT-2 (Q8_0), a rank-64 adapter, a program whose prefix is 250
tokens, and inputs of 30 tokens; every call makes exactly 8 tokens (the EOS row is zero).

Runs, one after another in this process and its clusters' worker processes:
- local: `fn.map(texts, max_tokens=8)` (one engine thread per core);
- cluster 2x1: `paw_lite.dask.map` over a Bag on LocalCluster(n_workers=2, threads_per_worker=1);
- cluster 1x1: the same on one single-threaded worker.
Cluster rows time the map on warm workers (the program already loaded, as on a long-running
cluster: loading is once per worker process, not per partition) and report the load apart.

Per-partition overhead (scheduling, sending inputs and outputs, the task's own work besides
generating): the same map with max_tokens=0 (every input tokenized, nothing generated) over small
partitions, on the warm 2x1 cluster: worker-seconds per partition. As a share of a partition's
compute (its inputs x one worker thread's seconds per input, from the 1x1 run) it gives the
partition size that keeps the overhead under 5%."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path



def _interpreter_bench():
    """benchmarks/interpreter_bench.py, which makes (and caches) the full-size files, loaded by its path."""
    import importlib.util

    path = Path(__file__).resolve().parent / "interpreter_bench.py"
    spec = importlib.util.spec_from_file_location("paw_lite_interpreter_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


files = _interpreter_bench()

OUTPUT_TOKENS = 8
TARGET_RATIO = 0.85  # cluster 2x1 throughput against local fn.map
OVERHEAD_BUDGET = 0.05
PROBE_PARTITION = 16  # inputs per partition of the overhead probe: many partitions, little work each
SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)


def _cluster(n_workers: int):
    """The cluster `paw-lite run --scheduler local:N` starts."""
    from distributed import Client

    from paw_lite.dask.file_run import local_cluster

    cluster = local_cluster(n_workers)
    return cluster, Client(cluster)


def _load_everywhere(client, shipped, opts) -> float:
    """Load the program on every worker at once; the wall time of that (per worker, in parallel)."""
    from paw_lite.dask import worker

    t = time.perf_counter()
    futures = [client.submit(worker.describe, shipped, opts, workers=[w], pure=False) for w in client.scheduler_info()["workers"]]
    client.gather(futures)
    return time.perf_counter() - t


def _timed_map(client, shipped, texts: list[str], partition_size: int, max_tokens: int,
               base: str) -> tuple[float, float, list[str]]:
    """(wall seconds, CPU seconds of all workers, outputs) of a map."""
    import dask.bag as db

    import paw_lite.dask

    bag = db.from_sequence(texts, partition_size=partition_size)
    outputs = paw_lite.dask.map(shipped, bag, max_tokens=max_tokens, base_model=base)
    cpu = client.run(time.process_time)
    t = time.perf_counter()
    result = outputs.compute()
    wall = time.perf_counter() - t
    cpu_after = client.run(time.process_time)
    return wall, sum(cpu_after[w] - cpu[w] for w in cpu), result


def _cluster_run(n_workers: int, shipped, texts: list[str], partition_size: int, base: str, log, probe: bool) -> dict:
    from paw_lite.dask import MapOptions

    cluster, client = _cluster(n_workers)
    try:
        load_s = _load_everywhere(client, shipped, MapOptions(max_tokens=OUTPUT_TOKENS, base_model=base))
        log(f"bench: cluster {n_workers}x1: program loaded on every worker in {load_s:.1f} s; mapping {len(texts)} inputs ...")
        wall, cpu, outputs = _timed_map(client, shipped, texts, partition_size, OUTPUT_TOKENS, base)
        row = {"workers": n_workers, "threads_per_worker": 1, "partition_size": partition_size,
               "partitions": -(-len(texts) // partition_size), "load_s": load_s, "map_s": wall,
               "inputs_per_s": len(texts) / wall, "cpu_s_per_input": cpu / len(texts), "outputs": outputs}
        if probe:
            n = len(texts)
            log(f"bench: cluster {n_workers}x1: overhead probe, {n // PROBE_PARTITION} partitions of {PROBE_PARTITION}, "
                f"nothing generated ...")
            probe_s, probe_cpu, _ = _timed_map(client, shipped, texts, PROBE_PARTITION, 0, base)
            parts = n // PROBE_PARTITION
            row["probe"] = {"partition_size": PROBE_PARTITION, "partitions": parts, "wall_s": probe_s,
                            "worker_s_per_partition": probe_s * n_workers / parts, "worker_cpu_s_per_partition": probe_cpu / parts}
        return row
    finally:
        client.close()
        cluster.close()


def run(inputs: int = 2048, partition_size: int = 256, quick: bool = False, log=print) -> dict:
    import numpy as np

    import paw_lite
    import paw_lite.dask

    work = files.ensure_workload(files.DEFAULT_CACHE, inputs, log)
    texts = [c["text"] for c in work.calls[:inputs]]
    base = str(work.base)
    load_before = os.getloadavg()
    started = time.time()

    log("bench: local fn.map ...")
    t = time.perf_counter()
    fn = paw_lite.function(work.program, base_model=work.base)
    local_load = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    local_outputs = fn.map(texts, max_tokens=OUTPUT_TOKENS)
    local_s, local_cpu = time.perf_counter() - t, time.process_time() - cpu
    fn.close()
    del fn  # its ~1 GB freed before the clusters' workers load their own
    local = {"load_s": local_load, "map_s": local_s, "inputs_per_s": inputs / local_s, "cpu_s_per_input": local_cpu / inputs}

    shipped = paw_lite.dask.ship(work.program)
    two = _cluster_run(2, shipped, texts, partition_size, base, log, probe=True)
    one = _cluster_run(1, shipped, texts, partition_size, base, log, probe=False)
    equal = two.pop("outputs") == local_outputs and one.pop("outputs") == local_outputs

    # One worker thread's seconds per input, its partitions' overhead included (it is small at this size).
    per_input_s = one["map_s"] / inputs
    per_partition_s = two["probe"]["worker_s_per_partition"]
    shares = {size: per_partition_s / (size * per_input_s) for size in SIZES}
    enough = next((size for size in SIZES if shares[size] < OVERHEAD_BUDGET), None)
    ratio = two["inputs_per_s"] / local["inputs_per_s"]
    return {
        "inputs": inputs, "output_tokens": OUTPUT_TOKENS, "outputs_equal_local": equal,
        "local": local, "cluster_2x1": two, "cluster_1x1": one,
        "ratio_2x1_vs_local": ratio, "ratio_1x1_vs_local": one["inputs_per_s"] / local["inputs_per_s"],
        # CPU seconds per input, local over 2x1: what the throughput ratio would be on idle cores (both
        # runs then keep both cores busy); much less sensitive to other jobs' load than wall time.
        "cpu_ratio_2x1_vs_local": local["cpu_s_per_input"] / two["cpu_s_per_input"],
        "scaling_2x1_vs_1x1": two["inputs_per_s"] / one["inputs_per_s"],
        "overhead": {"worker_s_per_partition": per_partition_s, "worker_s_per_input": per_input_s,
                     "share_by_partition_size": shares, "smallest_partition_under_5pct": enough,
                     "program_load_s_per_worker": two["load_s"]},
        "target": {"ratio_2x1_vs_local": TARGET_RATIO, "met": ratio >= TARGET_RATIO},
        "conditions": {"quick": quick, "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                       "python": platform.python_version(), "numpy": np.__version__,
                       "dask": __import__("dask").__version__, "distributed": __import__("distributed").__version__,
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "wall_s": time.time() - started},
    }


def format_table(r: dict) -> str:
    rows = [("local fn.map (one engine thread per core)", r["local"], None),
            ("LocalCluster 2 workers x 1 thread", r["cluster_2x1"], r["ratio_2x1_vs_local"]),
            ("LocalCluster 1 worker x 1 thread", r["cluster_1x1"], r["ratio_1x1_vs_local"])]
    lines = [f"{r['inputs']} inputs of 30 tokens, {r['output_tokens']} output tokens each, full-size random GPT-2 (Q8_0), "
             f"rank-64 program, 250-token prefix", "",
             "| run | program load | map | inputs/s | vs local | CPU per input |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, row, ratio in rows:
        lines.append(f"| {label} | {row['load_s']:.1f} s | {row['map_s']:.1f} s | {row['inputs_per_s']:.1f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} | {row['cpu_s_per_input'] * 1000:.0f} ms |")
    o = r["overhead"]
    c = r["conditions"]
    lines += ["", f"Outputs equal local fn.map on every input: {r['outputs_equal_local']}. "
                  f"2x1 against 1x1: {r['scaling_2x1_vs_1x1']:.2f}x. CPU per input, local over 2x1 (the throughput "
                  f"ratio on idle cores): {r['cpu_ratio_2x1_vs_local']:.2f}x.",
              f"Partition size {r['cluster_2x1']['partition_size']} ({r['cluster_2x1']['partitions']} partitions); program load "
              f"is once per worker process ({o['program_load_s_per_worker']:.1f} s, all workers at once), not per partition.",
              f"Per-partition overhead: {o['worker_s_per_partition'] * 1000:.0f} ms of a worker per partition (probe: "
              f"partitions of {PROBE_PARTITION}, nothing generated), against {o['worker_s_per_input'] * 1000:.0f} ms of "
              f"compute per input on one worker thread:",
              "| partition size | " + " | ".join(str(s) for s in SIZES) + " |",
              "| --- | " + " | ".join("---:" for _ in SIZES) + " |",
              "| overhead / compute | " + " | ".join(f"{v * 100:.2f}%" for v in o["share_by_partition_size"].values()) + " |",
              f"Smallest partition size under {OVERHEAD_BUDGET:.0%}: {o['smallest_partition_under_5pct']}.",
              f"{c['cpus']} CPUs, load average {c['loadavg_before'][0]:.2f} before, {c['loadavg_after'][0]:.2f} after "
              f"(a shared machine: other jobs' load makes every row slower and noisier); dask {c['dask']}, "
              f"distributed {c['distributed']}, numpy {c['numpy']}; {c['wall_s']:.0f} s in all.",
              f"target ratio_2x1_vs_local >= {TARGET_RATIO}: {'met' if r['target']['met'] else 'NOT met'} "
              f"({r['ratio_2x1_vs_local']:.2f})"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quick", action="store_true", help="256 inputs in partitions of 64 (minutes, not ten)")
    p.add_argument("--inputs", type=int, default=2048, help="inputs to map (default 2048)")
    p.add_argument("--partition-size", type=int, default=256, help="inputs per partition of the cluster runs (default 256)")
    p.add_argument("--output", type=Path, default=None,
                   help="also write the JSON here (default benchmarks/.cache/interpreter/dask_results.json)")
    return p


def main() -> dict:
    args = build_parser().parse_args()
    if args.quick:
        args.inputs, args.partition_size = 256, 64
    if args.inputs < PROBE_PARTITION or args.partition_size < 1:
        raise SystemExit(f"--inputs must be at least {PROBE_PARTITION} and --partition-size at least 1")
    result = run(args.inputs, args.partition_size, args.quick, log=lambda m: print(m, file=sys.stderr))
    out = args.output or files.DEFAULT_CACHE / "dask_results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return result


if __name__ == "__main__":
    main()
