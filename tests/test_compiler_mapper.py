"""The NumPy mapper against the public reimplementation avra-m3/program-as-weights-server, checked against the published lora_mapper.pt shapes written in PyTorch; its file validation; the exact GELU;
the layer map."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oracles import oracle
from compiler_fixtures import max_rel, random_mapper_state, save_mapper, torch_mapper
from paw_lite.compiler.encoder import depth_layers
from paw_lite.compiler.mapper import Mapper, MapperShape, gelu_erf
from paw_lite.errors import IncompatibleModelError, InvalidFileError
from paw_lite.gpt2_layout import GPT2Config

torch = oracle("torch")

HIDDEN, RANK, BASES = 96, 16, 6


def interp(n_layer=3, n_embd=32) -> GPT2Config:
    return GPT2Config(n_vocab=50257, n_ctx=256, n_embd=n_embd, n_head=2, n_layer=n_layer, n_ff=4 * n_embd, eps=1e-5)


def shape(config: GPT2Config) -> MapperShape:
    return MapperShape(hidden=HIDDEN, interpreter=config, rank=RANK, n_bases=BASES)


@pytest.mark.parametrize("n_layer,trunk", [(3, HIDDEN), (12, 48)])
def test_numpy_mapper_matches_torch(tmp_path, n_layer, trunk):
    config = interp(n_layer)
    state = random_mapper_state(HIDDEN, config, RANK, BASES, trunk=trunk, seed=n_layer)
    path = save_mapper(tmp_path / "mapper.safetensors", state)
    rng = np.random.default_rng(7)
    hs = (rng.standard_normal((n_layer, 64, HIDDEN)) * 3).astype(np.float32)

    got = Mapper.load(path, shape(config))(hs)
    want = torch_mapper(state, list(hs), n_layer, BASES)

    assert list(got) == [f"blk.{i}.{m}.weight.lora_{ab}" for i in range(n_layer)
                         for m in ("attn_output", "attn_qkv", "ffn_up", "ffn_down") for ab in "ab"]
    for name, arr in got.items():
        assert arr.dtype == np.float32 and arr.shape == want[name].shape, name
        assert max_rel(arr, want[name]) < 1e-5, (name, max_rel(arr, want[name]))
    # The LoRA shapes the adapter needs: lora_a (r, d_in), lora_b (d_out, r).
    assert got["blk.0.attn_qkv.weight.lora_a"].shape == (RANK, 32)
    assert got["blk.0.attn_qkv.weight.lora_b"].shape == (96, RANK)
    assert got["blk.0.ffn_down.weight.lora_a"].shape == (RANK, 128)


def test_gelu_is_the_exact_erf_gelu():
    x = np.linspace(-8, 8, 20001, dtype=np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert np.abs(gelu_erf(x) - want).max() <= 1e-6 * max(1.0, np.abs(want).max())
    # ...and not the tanh approximation, which differs by ~1e-4 around |x| = 2.
    tanh = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert np.abs(gelu_erf(x) - tanh).max() > 1e-4
    assert gelu_erf(np.array([1.0], np.float32))[0] == np.float32(0.5 * (1 + math.erf(1 / math.sqrt(2))))


def test_depth_layers():
    assert depth_layers(36, 12) == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35]
    assert depth_layers(4, 12) == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert depth_layers(4, 2) == [1, 3]
    for lc, li in [(36, 12), (4, 12), (4, 2), (28, 12), (1, 3)]:
        layers = depth_layers(lc, li)
        assert layers[-1] == lc - 1 and all(0 <= t < lc for t in layers) and layers == sorted(layers)
        # only the last interpreter layer reads the compiler's last block (the one taken after the norm)
        assert layers.count(lc - 1) == 1 or lc == 1


def _write(tmp_path, state):
    return save_mapper(tmp_path / "m.safetensors", state)


def test_rejects_missing_and_unknown_keys(tmp_path):
    config = interp()
    state = random_mapper_state(HIDDEN, config, RANK, BASES)
    del state["B_bases_c_fc"]
    state["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(InvalidFileError, match=r"missing \['B_bases_c_fc'\], unexpected \['extra.weight'\]"):
        Mapper.load(_write(tmp_path, state), shape(config))


def test_rejects_shapes_that_do_not_fit_the_models(tmp_path):
    config = interp()
    path = _write(tmp_path, random_mapper_state(HIDDEN, config, RANK, BASES))
    with pytest.raises(IncompatibleModelError, match=r"coeff_head.weight has shape \(144, 96\), expected \(192, 96\)"):
        Mapper.load(path, shape(interp(n_layer=4)))  # interpreter with another layer count
    with pytest.raises(IncompatibleModelError, match=r"trunk.0.weight has shape \(96, 96\), expected \(96, 128\)"):
        Mapper.load(path, MapperShape(hidden=128, interpreter=config, rank=RANK, n_bases=BASES))
    with pytest.raises(IncompatibleModelError, match=r"A_bases_attn_c_proj has shape \(6, 16, 32\), expected \(6, 8, 32\)"):
        Mapper.load(path, MapperShape(hidden=HIDDEN, interpreter=config, rank=8, n_bases=BASES))


def test_rejects_non_fp32_and_non_finite(tmp_path):
    config = interp()
    state = random_mapper_state(HIDDEN, config, RANK, BASES)
    state["trunk.0.bias"] = state["trunk.0.bias"].astype(np.float16)
    with pytest.raises(InvalidFileError, match="trunk.0.bias is F16"):
        Mapper.load(_write(tmp_path, state), shape(config))
    state = random_mapper_state(HIDDEN, config, RANK, BASES)
    state["coeff_head.bias"][3] = np.nan
    with pytest.raises(InvalidFileError, match="coeff_head.bias holds NaN"):
        Mapper.load(_write(tmp_path, state), shape(config))


def test_rejects_wrong_hidden_state_shape(tmp_path):
    config = interp()
    mapper = Mapper.load(_write(tmp_path, random_mapper_state(HIDDEN, config, RANK, BASES)), shape(config))
    with pytest.raises(ValueError, match="expected \\(3, positions, 96\\)"):
        mapper(np.zeros((2, 64, HIDDEN), np.float32))


def test_expected_shapes_are_the_published_ones():
    """the public reimplementation avra-m3/program-as-weights-server, checked against the published lora_mapper.pt shapes for the published compiler (hidden 2560) and GPT-2 124M (12 x 768), rank 64, 64 bases."""
    gpt2 = GPT2Config(n_vocab=50257, n_ctx=2048, n_embd=768, n_head=12, n_layer=12, n_ff=3072, eps=1e-5)
    assert MapperShape(hidden=2560, interpreter=gpt2, rank=64, n_bases=64).expected(2560) == {
        "trunk.0.weight": (2560, 2560), "trunk.0.bias": (2560,),
        "coeff_head.weight": (6144, 2560), "coeff_head.bias": (6144,),
        "A_bases_attn_c_proj": (64, 64, 768), "B_bases_attn_c_proj": (64, 768, 64),
        "A_bases_c_attn": (64, 64, 768), "B_bases_c_attn": (64, 2304, 64),
        "A_bases_c_fc": (64, 64, 768), "B_bases_c_fc": (64, 3072, 64),
        "A_bases_mlp_c_proj": (64, 64, 3072), "B_bases_mlp_c_proj": (64, 768, 64),
    }
