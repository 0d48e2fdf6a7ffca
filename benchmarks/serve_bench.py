"""`paw-lite serve` against llama-cpp-python's own OpenAI server, on the same files, in one run.

    python benchmarks/serve_bench.py [--json] [--quick] [--requests N] [--clients 1,4,16]

The files are the interpreter benchmark's (benchmarks/interpreter_bench.py, generated once into
benchmarks/.cache/interpreter): a full-size random GPT-2 as Q8_0 GGUF, a rank-64 Q4_0 adapter and
the program made of them (a 250-token prefix; inputs of 30 tokens). Every request asks for 8
output tokens, and every answer has 8 (the random model never picks EOS; checked on `usage`).

Each server runs in its own process, one at a time, on a free loopback port:
- `paw-lite serve --programs DIR --base-model GGUF`: the program as model "bench"; a request's
  prompt is the program's input;
- `python -m llama_cpp.server --model GGUF --lora_path ADAPTER` with its defaults; a request's
  prompt is the program's whole prompt (the template with the input), temperature 0 (greedy).
For 1, 4 and 16 concurrent clients (threads, one HTTP connection each, all requests sent as fast
as answers come back), it measures completed requests per second and the p50/p99 latency. The
in-process baseline is `paw_lite.function(...)(text, max_tokens=8)` one call at a time, for the
lone-request ratio. Targets (issue 18): 16 clients >= 4x paw-lite serve's 1-client throughput and
>= 5x llama_cpp.server's 16-client throughput; the p50 of a lone request <= 1.3x the in-process call."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from paw_lite.cli.bench import bench_module


# interpreter_bench.py by its path (benchmarks/ is no package), one copy per process.
ib = bench_module(Path(__file__).resolve().with_name("interpreter_bench.py"))

DEFAULT_CACHE = ib.DEFAULT_CACHE
OUTPUT_NAME = "serve-results.json"  # written into the cache folder unless --output says otherwise
OUTPUT_TOKENS = ib.OUTPUT_TOKENS  # 8
SERVERS = ("paw-lite serve", "llama_cpp.server")
CLIENTS = (1, 4, 16)
START_TIMEOUT_S = 300  # loading the 140 MB model and starting a server; only a broken server reaches it
TARGETS = [  # (key, description, comparison, bound)
    ("scaling_16_vs_1", "paw-lite serve, 16 clients / 1 client (throughput)", ">=", 4.0),
    ("vs_llama_16", "paw-lite serve / llama_cpp.server, 16 clients (throughput)", ">=", 5.0),
    ("lone_p50_vs_in_process", "paw-lite serve lone request p50 / in-process call p50", "<=", 1.3),
]


# -- the servers --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server command in its own process group, stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, cmd: list[str], url: str | None, log_path: Path):
        self.cmd, self.url, self.log_path = cmd, url, log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True)
        try:
            if self.url is None:  # paw-lite serve --json says where it listens, once it does
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"{' '.join(self.cmd[:4])} exited before listening:\n{self._tail()}")
                self.url = json.loads(line)["url"]
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)  # never leave a server running behind a failed start
            raise
        return self

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{' '.join(self.cmd[:4])} exited ({self.proc.returncode}):\n{self._tail()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling a starting process: no event to wait on
        raise RuntimeError(f"{' '.join(self.cmd[:4])} did not answer within {START_TIMEOUT_S} s:\n{self._tail()}")

    def _tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def paw_lite_server(w, folder: Path) -> ServerProcess:
    programs = folder / "programs"
    programs.mkdir(exist_ok=True)
    link = programs / "bench.paw"
    if not link.exists():
        link.symlink_to(w.program)
    cmd = [sys.executable, "-m", "paw_lite", "serve", "--programs", str(programs), "--base-model", str(w.base),
           "--data-dir", str(folder / "data"), "--port", "0", "--json"]
    return ServerProcess(cmd, None, folder / "paw-lite-serve.log")


def llama_server(w, folder: Path) -> ServerProcess:
    port = _free_port()
    # --model_alias only names the model as paw-lite serve names it; every performance setting is its default
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(w.base), "--lora_path", str(w.adapter),
           "--model_alias", "bench", "--host", "127.0.0.1", "--port", str(port)]
    return ServerProcess(cmd, f"http://127.0.0.1:{port}", folder / "llama-cpp-server.log")


def request_body(server: str, text: str, template: str) -> dict:
    if server == "paw-lite serve":
        return {"model": "bench", "prompt": text, "max_tokens": OUTPUT_TOKENS, "temperature": 0}
    return {"model": "bench", "prompt": template.replace("{INPUT_PLACEHOLDER}", text), "max_tokens": OUTPUT_TOKENS,
            "temperature": 0}


# -- the load -----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks."""
    s = sorted(values)
    if not s:
        raise ValueError("no values")
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def load(url: str, bodies: list[dict], clients: int) -> dict:
    """Send every body with `clients` threads, each on its own connection, one request after
    another; return throughput and latencies. Every answer must carry OUTPUT_TOKENS tokens."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))
    start = threading.Barrier(clients + 1)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            start.wait()
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/completions", json=bodies[i])
                    r.raise_for_status()
                    tokens = r.json()["usage"]["completion_tokens"]
                    if tokens != OUTPUT_TOKENS:
                        raise RuntimeError(f"answer {i} has {tokens} tokens, not {OUTPUT_TOKENS}")
                except Exception as exc:  # noqa: BLE001 - a failed request is reported, not hidden
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)

    wall = ib.time_threads([threading.Thread(target=client) for _ in range(clients)], start)
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(bodies)} requests to {url} failed; first: {failures[0]}")
    return {"clients": clients, "requests": len(bodies), "wall_s": wall, "throughput_rps": len(bodies) / wall,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99)}


def in_process(w, texts: list[str], requests: int, clients: tuple[int, ...]) -> tuple[float, dict[int, float]]:
    """The in-process figures, on one `paw_lite.function`: the p50 of `fn(text, max_tokens=8)`
    one call after another (after one warm-up call), and for each client count n the throughput
    of `fn.map` over the requests' inputs with n in flight on the one engine (batch_size=n,
    workers=1), as a served program runs them: the ceiling of a server holding n requests."""
    import paw_lite

    inputs = [texts[i % len(texts)] for i in range(requests)]
    with paw_lite.function(w.program, base_model=w.base) as fn:
        fn(texts[0], max_tokens=OUTPUT_TOKENS)
        times = []
        for text in texts[:min(len(texts), max(16, requests // 4))]:
            t0 = time.perf_counter()
            fn(text, max_tokens=OUTPUT_TOKENS)
            times.append(time.perf_counter() - t0)
        ceilings = {}
        for n in clients:
            t0 = time.perf_counter()
            fn.map(inputs, max_tokens=OUTPUT_TOKENS, batch_size=n, workers=1)
            ceilings[n] = requests / (time.perf_counter() - t0)
    return statistics.median(times), ceilings


def run(cache: Path = DEFAULT_CACHE, requests: int = 128, clients: tuple[int, ...] = CLIENTS, log=print) -> dict:
    from paw_lite.program import Program

    w = ib.ensure_workload(cache, requests, log)
    template = Program.load(w.program).template
    texts = [c["text"] for c in w.calls]
    load_before = os.getloadavg()
    t_start = time.time()
    log("bench: in-process calls and maps ...")
    baseline, ceilings = in_process(w, texts, requests, clients)
    levels: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="serve-bench.") as tmp:
        for name, start in (("paw-lite serve", paw_lite_server), ("llama_cpp.server", llama_server)):
            log(f"bench: starting {name} ...")
            with start(w, Path(tmp)) as server:
                bodies = [request_body(name, texts[i % len(texts)], template) for i in range(requests)]
                load(server.url, bodies[:2], 1)  # warm-up: the program loaded, its prefix evaluated
                levels[name] = []
                for n in clients:
                    log(f"bench: {name}, {n} client(s), {requests} requests ...")
                    levels[name].append(load(server.url, bodies, n))
    import llama_cpp
    import numpy as np

    for lv in levels["paw-lite serve"]:
        lv["in_process_map_rps"] = ceilings[lv["clients"]]
    result = {"levels": levels, "in_process_p50_s": baseline, "ratios": ratios(levels, baseline),
              "conditions": {"requests": requests, "clients": list(clients), "output_tokens": OUTPUT_TOKENS,
                             "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                             "python": platform.python_version(), "numpy": np.__version__,
                             "llama_cpp_python": llama_cpp.__version__, "loadavg_before": load_before,
                             "loadavg_after": os.getloadavg(), "wall_s": time.time() - t_start}}
    return result


def ratios(levels: dict[str, list[dict]], baseline: float) -> dict:
    paw = {lv["clients"]: lv for lv in levels.get("paw-lite serve", [])}
    llama = {lv["clients"]: lv for lv in levels.get("llama_cpp.server", [])}
    out = {}
    if 1 in paw and 16 in paw:
        out["scaling_16_vs_1"] = paw[16]["throughput_rps"] / paw[1]["throughput_rps"]
    if 16 in paw and 16 in llama:
        out["vs_llama_16"] = paw[16]["throughput_rps"] / llama[16]["throughput_rps"]
    if 1 in paw:
        out["lone_p50_vs_in_process"] = paw[1]["p50_s"] / baseline
    return out


def _ms(v: float) -> str:
    return f"{v * 1000:.0f} ms"


def _level_cells(level: dict | None) -> list[str]:
    """A server's throughput, p50 and p99 at one client count (n/a where it was not measured)."""
    if level is None:
        return ["n/a"] * 3
    return [f"{level['throughput_rps']:.2f}", _ms(level["p50_s"]), _ms(level["p99_s"])]


def format_table(result: dict) -> str:
    lines = ["| clients | paw-lite serve req/s | p50 | p99 | in-process fn.map, n in flight | llama_cpp.server req/s | p50 | p99 "
             "| paw-lite / llama |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    paw = {lv["clients"]: lv for lv in result["levels"].get("paw-lite serve", [])}
    llama = {lv["clients"]: lv for lv in result["levels"].get("llama_cpp.server", [])}
    for n in sorted(set(paw) | set(llama)):
        p, q = paw.get(n), llama.get(n)
        ceiling = "n/a" if p is None or "in_process_map_rps" not in p else f"{p['in_process_map_rps']:.2f}"
        cells = [str(n), *_level_cells(p), ceiling, *_level_cells(q)]
        cells.append(f"{p['throughput_rps'] / q['throughput_rps']:.2f}x" if p and q else "")
        lines.append("| " + " | ".join(cells) + " |")
    c = result["conditions"]
    lines += ["", f"In-process call (paw_lite.function, {c['output_tokens']} tokens): p50 {_ms(result['in_process_p50_s'])}.",
              f"{c['requests']} requests per level, each answer {c['output_tokens']} tokens; {c['cpus']} CPUs, load average "
              f"{c['loadavg_before'][0]:.2f} before, {c['loadavg_after'][0]:.2f} after; numpy {c['numpy']}, "
              f"llama-cpp-python {c['llama_cpp_python']} (llama_cpp.server with its defaults)."]
    for key, what, how, bound in TARGETS:
        value = result["ratios"].get(key)
        if value is None:
            lines.append(f"target {key} ({what}): {how} {bound:g}: not measured")
            continue
        ok = value >= bound if how == ">=" else value <= bound
        lines.append(f"target {key} ({what}): {how} {bound:g}: {'met' if ok else 'NOT met'} ({value:.2f})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--quick", action="store_true", help="a short smoke run (16 requests per level)")
    p.add_argument("--requests", type=int, default=128, help="requests per concurrency level (default 128)")
    p.add_argument("--clients", default=",".join(map(str, CLIENTS)),
                   help="concurrency levels, comma-separated (default 1,4,16)")
    p.add_argument("--cache", type=Path, default=None, help=f"the benchmark files' folder (default {DEFAULT_CACHE})")
    p.add_argument("--output", type=Path, default=None, help=f"where to write the JSON result (default CACHE/{OUTPUT_NAME})")
    return p


def parse_clients(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--clients {text!r}: give whole numbers separated by commas, e.g. 1,4,16") from None
    if not levels or min(levels) < 1:
        raise SystemExit(f"--clients {text!r}: every level must be at least 1")
    return levels


def main(argv: list[str] | None = None, runner=None) -> dict:
    from paw_lite.atomic import atomic_path, check_writable

    args = build_parser().parse_args(argv)
    clients = parse_clients(args.clients)
    if args.quick:
        args.requests = 16
    if args.requests < 1:
        raise SystemExit(f"--requests must be at least 1, not {args.requests}")
    cache = args.cache or DEFAULT_CACHE
    out = args.output or cache / OUTPUT_NAME
    check_writable(cache, "--cache", into=True)  # before minutes of work, not after
    check_writable(out, "--output")
    result = (runner or run)(cache, args.requests, clients, lambda msg: print(msg, file=sys.stderr))
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return result


if __name__ == "__main__":
    main()
