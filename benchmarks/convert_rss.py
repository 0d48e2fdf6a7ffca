"""Peak memory of `convert_qwen3` on a model whose tensors total several GB.

Writes a random bf16 Qwen3 folder with Qwen3-4B's widths (hidden 2560, 32/8 heads of 128, FFN 9728,
151,733-token vocabulary with the real Qwen tokenizer) and `--layers` blocks (12 by default:
3.2 GB of bf16) into benchmarks/.cache, then converts it in a child process per type while
sampling /proc/<pid>/status of it and its children (llama.cpp's quantizer). Reports peak RSS
(the larger of one process's VmHWM and the tree's summed VmRSS), its anonymous part (RssAnon:
what the processes allocated; the rest is file pages mapped from the source, which the kernel can
drop), and the largest tensor, against the issue's bound "2 GB plus one tensor".

    python benchmarks/convert_rss.py [--layers 12] [--types q8_0 q4_k_m] [--keep]

A benchmark, not a test: it takes minutes and needs ~10 GB of disk."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 2560, 32, 8, 128, 9728, 151733
SHARD_BYTES = 2 << 30


def tensor_shapes(n_layer: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN), p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": (HEAD_DIM,), p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN), p + "mlp.down_proj.weight": (HIDDEN, FFN),
        })
    return shapes


def random_bf16(n: int, rng: np.random.Generator) -> np.ndarray:
    """Finite bf16 values of magnitude ~0.01: random sign and mantissa, a fixed exponent."""
    return (rng.integers(0, 1 << 16, size=n, dtype=np.uint16) & 0x807F) | 0x3C00


def write_shard(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """A safetensors file written tensor by tensor (safetensors.numpy.save_file wants it all in memory)."""
    header, offset = {}, 0
    for name in names:
        n = int(np.prod(shapes[name]))
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in names:
            n = int(np.prod(shapes[name]))
            for start in range(0, n, 1 << 26):
                random_bf16(min(1 << 26, n - start), rng).tofile(f)


def make_model(folder: Path, n_layer: int) -> int:
    from paw_lite.testing.qwen3 import save_qwen_tokenizer
    from paw_lite.testing.vocab import vocab_dir

    shapes = tensor_shapes(n_layer)
    total = sum(2 * int(np.prod(s)) for s in shapes.values())
    marker = folder / ".complete"
    if marker.exists() and marker.read_text() == str(total):
        return total
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        if current and size + 2 * int(np.prod(shape)) > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += 2 * int(np.prod(shape))
    shards.append(current)
    rng = np.random.default_rng(0)
    weight_map = {}
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        print(f"writing {fname}", file=sys.stderr)
        write_shard(folder / fname, names, shapes, rng)
        weight_map.update({n: fname for n in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": n_layer, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0}, "tie_word_embeddings": True,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"}))
    save_qwen_tokenizer(folder, vocab_dir(), template_in_jinja_file=True)
    marker.write_text(str(total))
    return total


_CHILD = """
import sys
from paw_lite.convert.qwen3 import convert_qwen3
convert_qwen3(sys.argv[1], sys.argv[2], sys.argv[3])
"""


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _tree(pid: int) -> list[int]:
    """pid and its descendants (the K-quants run llama.cpp's quantizer in a child process)."""
    pids = [pid]
    for p in pids:
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    pids += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


def measure(folder: Path, out: Path, qtype: str) -> dict[str, float]:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), str(out), qtype])
    peak = {"VmHWM": 0, "VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()

    def sample() -> None:
        # Each process's own peak (VmHWM, exact), and the whole tree's resident memory summed per
        # sample (the converter stays resident while its quantizer child runs).
        while proc.poll() is None:
            total = dict.fromkeys(("VmRSS", "RssAnon", "RssFile"), 0)
            for pid in _tree(proc.pid):
                try:
                    s = _status(pid)
                except (FileNotFoundError, ProcessLookupError):
                    continue
                peak["VmHWM"] = max(peak["VmHWM"], s.get("VmHWM", 0))
                for k in total:
                    total[k] += s.get(k, 0)
            for k in total:
                peak[k] = max(peak[k], total[k])
            time.sleep(0.05)

    t = threading.Thread(target=sample)
    t.start()
    rc = proc.wait()
    t.join()
    if rc != 0:
        raise SystemExit(f"conversion to {qtype} failed with exit status {rc}")
    return {"type": qtype, "seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": max(peak["VmHWM"], peak["VmRSS"]) / 1e9,
            "peak_anon_gb": peak["RssAnon"] / 1e9, "peak_file_gb": peak["RssFile"] / 1e9, "out_gb": out.stat().st_size / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_k_m"])
    ap.add_argument("--keep", action="store_true", help="keep the converted files")
    args = ap.parse_args()
    folder = CACHE / f"qwen3-random-{args.layers}l"
    total = make_model(folder, args.layers)
    largest_f32 = VOCAB * HIDDEN * 4
    print(f"source: {total / 1e9:.2f} GB bf16 in {folder}; largest tensor token_embd {VOCAB}x{HIDDEN} "
          f"({largest_f32 / 1e9:.2f} GB as f32, {largest_f32 / 2e9:.2f} GB as bf16)")
    rows = []
    for qtype in args.types:
        out = CACHE / f"converted-{qtype}.gguf"
        rows.append(measure(folder, out, qtype))
        if not args.keep:
            out.unlink()
        r = rows[-1]
        print(f"{qtype:>7}: {r['seconds']:7.1f} s  peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(anonymous {r['peak_anon_gb']:.2f} GB, file-backed {r['peak_file_gb']:.2f} GB)  output {r['out_gb']:.2f} GB")
    print(json.dumps({"source_gb": total / 1e9, "cpu_count": os.cpu_count(), "results": rows}))


if __name__ == "__main__":
    main()
