"""lora_mapper.pt -> mapper.safetensors: values identical to torch.load, keys and shapes validated
against the compiler meta and the public reimplementation avra-m3/program-as-weights-server, checked against the published lora_mapper.pt shapes, the compiler's Mapper accepts and runs the result
like the PyTorch mapper on the original file, bad inputs leave no file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oracles import oracle
from compiler_fixtures import max_rel, random_mapper_state, torch_mapper, write_compiler_meta
from paw_lite.compiler.config import CompilerMeta
from paw_lite.compiler.mapper import Mapper
from paw_lite.convert.mapper import PAW_GPT2, convert_mapper, mapper_shape
from paw_lite.errors import IncompatibleModelError, InvalidFileError
from paw_lite.gpt2_layout import GPT2Config
from paw_lite.safetensors_file import SafetensorsFile

torch = oracle("torch")

HIDDEN, RANK, BASES = 64, 8, 4
INTERP = GPT2Config(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_ff=256, eps=1e-5)


@pytest.fixture
def meta(tmp_path) -> CompilerMeta:
    return CompilerMeta.load(write_compiler_meta(tmp_path / "meta.json", rank=RANK, n_bases=BASES))


def save_pt(path: Path, state: dict[str, np.ndarray], dtype=None) -> Path:
    tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    torch.save(tensors, path)
    return path


def test_roundtrip_and_consumer(tmp_path, meta):
    state = random_mapper_state(HIDDEN, INTERP, RANK, BASES, trunk=48, seed=1)
    src = save_pt(tmp_path / "lora_mapper.pt", state)
    shape = mapper_shape(meta, INTERP, HIDDEN)
    out = convert_mapper(src, tmp_path / "mapper.safetensors", shape)
    st = SafetensorsFile(out)
    ref = torch.load(src, weights_only=True)
    assert sorted(st.keys()) == sorted(ref)
    for key in ref:
        assert st.dtype_name(key) == "F32" and np.array_equal(st.raw(key), ref[key].numpy()), key
    # the compiler's reader runs it exactly as the PyTorch mapper runs the original state dict
    hs = (np.random.default_rng(2).standard_normal((INTERP.n_layer, 64, HIDDEN)) * 2).astype(np.float32)
    got = Mapper.load(out, shape)(hs)
    want = torch_mapper(state, list(hs), INTERP.n_layer, BASES)
    assert max(max_rel(got[k], want[k]) for k in want) < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_widened_exactly(tmp_path, meta, dtype):
    state = random_mapper_state(HIDDEN, INTERP, RANK, BASES, seed=3)
    src = save_pt(tmp_path / "m.pt", state, getattr(torch, dtype))
    out = convert_mapper(src, tmp_path / "m.safetensors", mapper_shape(meta, INTERP, HIDDEN))
    ref = torch.load(src, weights_only=True)
    st = SafetensorsFile(out)
    assert all(np.array_equal(st.f32(k), ref[k].float().numpy()) for k in ref)


def test_meta_sizes_and_paw_defaults(meta):
    shape = mapper_shape(meta, INTERP, HIDDEN)
    exp = shape.expected(HIDDEN)
    assert exp["A_bases_c_attn"] == (BASES, RANK, 64) and exp["B_bases_c_attn"] == (BASES, 192, RANK)
    assert exp["coeff_head.weight"] == (INTERP.n_layer * 4 * BASES * 2, HIDDEN)
    # without meta: the published mapper of the public reimplementation avra-m3/program-as-weights-server, checked against the published lora_mapper.pt shapes
    full = mapper_shape(None).expected(2560)
    assert full["trunk.0.weight"] == (2560, 2560) and full["coeff_head.weight"] == (6144, 2560)
    assert full["A_bases_attn_c_proj"] == (64, 64, 768) and full["B_bases_c_attn"] == (64, 2304, 64)
    assert full["A_bases_mlp_c_proj"] == (64, 64, 3072) and full["B_bases_c_fc"] == (64, 3072, 64)
    assert PAW_GPT2.n_layer == 12


def _fails(src: Path, out: Path, shape, exc, match: str) -> None:
    with pytest.raises(exc, match=match):
        convert_mapper(src, out, shape)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_bad_mappers_refused(tmp_path, meta):
    shape = mapper_shape(meta, INTERP, HIDDEN)
    out = tmp_path / "out.safetensors"
    good = random_mapper_state(HIDDEN, INTERP, RANK, BASES, seed=4)

    bad = dict(good, A_bases_c_fc=np.zeros((BASES, RANK + 1, 64), np.float32))
    _fails(save_pt(tmp_path / "shape.pt", bad), out, shape, IncompatibleModelError,
           r"A_bases_c_fc has shape \(4, 9, 64\), expected \(4, 8, 64\)")

    missing = {k: v for k, v in good.items() if k != "B_bases_c_fc"}
    _fails(save_pt(tmp_path / "missing.pt", missing), out, shape, InvalidFileError,
           r"not those of the published lora_mapper.pt for this shape \(rank \d+, \d+ bases\): missing \['B_bases_c_fc'\]")

    extra = dict(good, **{"trunk.2.weight": np.zeros((2, 2), np.float32)})
    _fails(save_pt(tmp_path / "extra.pt", extra), out, shape, InvalidFileError, r"unexpected \['trunk.2.weight'\]")

    _fails(save_pt(tmp_path / "gpt2.pt", {"wte.weight": np.zeros((3, 2), np.float32)}), out, shape, InvalidFileError,
           "not a PAW lora_mapper")

    nan = dict(good)
    nan["trunk.0.bias"] = nan["trunk.0.bias"].copy()
    nan["trunk.0.bias"][0] = np.nan
    _fails(save_pt(tmp_path / "nan.pt", nan), out, shape, InvalidFileError, "NaN or Inf")

    ints = dict(good, **{"trunk.0.bias": np.arange(HIDDEN)})
    _fails(save_pt(tmp_path / "int.pt", ints), out, shape, InvalidFileError, "expected floating point")

    # the published shapes do not fit a tiny mapper (no meta: rank 64, 64 bases, GPT-2 124M)
    _fails(save_pt(tmp_path / "tiny.pt", good), out, mapper_shape(None, None, HIDDEN), IncompatibleModelError, "has shape")


def test_the_meta_picks_the_interpreter_family(tmp_path):
    """paw-4b-qwen3-0.6b's meta.json names Qwen/Qwen3-0.6B: the published Standard shape (28 layers x 7
    modules, coefficient head 2560 -> 25,088); an interpreter no family has is refused."""
    path = write_compiler_meta(tmp_path / "meta.json", rank=64, n_bases=64, interpreter_model="Qwen/Qwen3-0.6B")
    shape = mapper_shape(CompilerMeta.load(path))
    assert shape.interpreter.n_layer == 28 and len(shape.modules) == 7
    assert shape.expected(2560)["coeff_head.weight"] == (25_088, 2560)
    assert shape.expected(2560)["A_bases_q_proj"] == (64, 64, 1024)
    assert shape.expected(2560)["B_bases_down_proj"] == (64, 1024, 64)
    with pytest.raises(IncompatibleModelError, match="not a qwen3 model"):
        mapper_shape(CompilerMeta.load(path), INTERP)  # a GPT-2 interpreter for a Standard compiler
    write_compiler_meta(path, interpreter_model="Qwen/Qwen3-1.7B")
    with pytest.raises(IncompatibleModelError, match="neither GPT-2 .* nor Qwen/Qwen3-0.6B"):
        mapper_shape(CompilerMeta.load(path))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paw_lite", *args], capture_output=True, text=True, timeout=120)


def test_cli(tmp_path, tiny_gguf):
    """`paw-lite convert mapper` with the interpreter's sizes read from its GGUF; errors are one line."""
    interp = GPT2Config(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_ff=256, eps=1e-5)  # = tiny_gguf
    state = random_mapper_state(HIDDEN, interp, RANK, BASES, seed=5)
    src = save_pt(tmp_path / "lora_mapper.pt", state)
    meta = write_compiler_meta(tmp_path / "meta.json", rank=RANK, n_bases=BASES)
    out = tmp_path / "mapper.safetensors"
    r = _cli("convert", "mapper", str(src), "-o", str(out), "--meta", str(meta), "--hidden", str(HIDDEN),
             "--interpreter", str(tiny_gguf), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["rank"] == RANK and info["n_bases"] == BASES and info["bytes"] == out.stat().st_size
    out2 = tmp_path / "nometa.safetensors"
    r = _cli("convert", "mapper", str(src), "-o", str(out2))  # published sizes expected: refused
    assert r.returncode == 2 and not out2.exists()
    assert len(r.stderr.strip().splitlines()) == 1 and "expected" in r.stderr
