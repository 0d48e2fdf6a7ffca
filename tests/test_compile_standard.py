"""Compiling Standard programs (Qwen3-0.6B interpreter, compiler paw-4b-qwen3-0.6b) end to end on tiny
models: the adapter equals a PyTorch oracle of the mapper fed transformers' hidden states of the
depth-ratio layers, the Q4_0 adapter is within Q4_0's error of it, the bundle carries the Standard
template and meta.json and the official SDK's importer accepts it; the family is picked from the
flag or the compiler meta, and files of the other family are refused with the fix. Plus the layer
map for 36 -> 28 and the mapper at full size.

The oracle mapper below is written from the public reimplementation avra-m3/program-as-weights-server's
description (src/paw_server/compile/mapper.py, pipeline.py): hidden states of the chosen compiler
layers at the prefix positions -> mean over layers and positions -> trunk (Linear + exact GELU) ->
coefficient head reshaped (layers, modules in sorted name order, bases, A/B) -> A and B as mixtures
of the module's basis matrices."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from oracles import oracle
from compiler_fixtures import ALPHA, PREFIX_STEPS, TINY_BASES, TINY_RANK, max_rel, save_mapper, tiny_qwen, write_compiler_meta
from standard_fixtures import (N_CTX, N_INTERP_LAYERS, STANDARD_META, module_dims, random_standard_mapper, standard_models_dir,
                               tiny_standard_interpreter)
from paw_lite.cli import main
from paw_lite.compiler import compile, compile_report
from paw_lite.compiler.config import default_files
from paw_lite.compiler.encoder import depth_layers, encoder_token_ids
from paw_lite.compiler.mapper import GPT2_MODULES, Mapper, MapperShape
from paw_lite.errors import IncompatibleModelError, InvalidFileError
from paw_lite.program import MEMBERS, content_program_id

oracle("llama_cpp", "transformers", "peft", "programasweights")
torch = oracle("torch")
F = oracle("torch.nn.functional")
pytestmark = pytest.mark.llama

SPEC = "Classify a log line as ALERT when it reports a failure, else QUIET."
PSEUDO = ("[PSEUDO_PROGRAM]\nTask: Answer ALERT for failures, QUIET otherwise.\n\nExamples:\n"
          "Input: disk full on /var\nOutput: ALERT\n\nInput: user logged in\nOutput: QUIET\n[END_PSEUDO_PROGRAM]")
# The Standard template as the published Standard programs ship it (Qwen chat wrapping, empty think block).
TEMPLATE = ("<|im_start|>user\n" + PSEUDO + "\n\n[INPUT]\n{INPUT_PLACEHOLDER}\n[END_INPUT]<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n")

# The 7 Qwen3 modules: the mapper's key suffix -> the GGUF module name (written out here, independently
# of paw_lite.qwen3_layout); the coefficient vector follows the suffixes in sorted order.
SUFFIX_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def oracle_mapper(state: dict[str, np.ndarray], prefix_hidden: list, n_layer: int, n_bases: int) -> dict[str, np.ndarray]:
    """The mapper in PyTorch fp32, GGUF-named output."""
    sd = {k: torch.from_numpy(v) for k, v in state.items()}
    pooled = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in prefix_hidden]).mean(dim=(0, 1))
    z = F.gelu(pooled @ sd["trunk.0.weight"].T + sd["trunk.0.bias"])
    modules = sorted(SUFFIX_TO_GGUF)
    coeff = (z @ sd["coeff_head.weight"].T + sd["coeff_head.bias"]).reshape(n_layer, len(modules), n_bases, 2)
    out = {}
    for layer in range(n_layer):
        for m, suffix in enumerate(modules):
            a = (coeff[layer, m, :, 0, None, None] * sd[f"A_bases_{suffix}"]).sum(dim=0)
            b = (coeff[layer, m, :, 1, None, None] * sd[f"B_bases_{suffix}"]).sum(dim=0)
            out[f"blk.{layer}.{SUFFIX_TO_GGUF[suffix]}.weight.lora_a"] = a.numpy()
            out[f"blk.{layer}.{SUFFIX_TO_GGUF[suffix]}.weight.lora_b"] = b.numpy()
    return out


def adapter_tensors(data: bytes, tmp_path) -> tuple[str, dict[str, tuple[str, np.ndarray]]]:
    """(general.architecture, name -> (type, float32 values)) of an adapter.gguf, read with gguf-py."""
    path = tmp_path / "adapter-read.gguf"
    path.write_bytes(data)
    reader = GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        values = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        out[t.name] = (t.tensor_type.name, values)
    return arch, out


# -- the layer map ------------------------------------------------------------------------------------


def test_depth_ratio_layers_36_to_28():
    """Interpreter layer l reads compiler layer int((l+1)*36/28) - 1, as the reimplementation's
    depth_ratio_layers; the last one is the compiler's last (read after the final norm)."""
    got = depth_layers(36, 28)
    assert got == [int((l + 1) * 36 / 28) - 1 for l in range(28)]
    # the reimplementation's depth_ratio_layers takes the ratio first, in floating point: the same here
    assert got == [int((l + 1) * (36 / 28)) - 1 for l in range(28)]
    assert got[:8] == [0, 1, 2, 4, 5, 6, 8, 9] and got[-1] == 35 and len(set(got)) == 28
    assert depth_layers(36, 12) == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35]  # Compact, unchanged
    assert depth_layers(4, N_INTERP_LAYERS) == [0, 1, 3]


# -- tiny Standard models -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, vocab_dir):
    return tiny_qwen(tmp_path_factory, vocab_dir)  # the 4-layer compiler (HF folder, F32 GGUF)


@pytest.fixture(scope="module")
def standard_interp(tmp_path_factory, vocab_dir):
    return tiny_standard_interpreter(tmp_path_factory, vocab_dir)


@pytest.fixture(scope="module")
def models(tmp_path_factory, qwen, standard_interp):
    """A models directory holding the Standard files under their default names."""
    d = tmp_path_factory.mktemp("std-models")
    return d, standard_models_dir(d, qwen, standard_interp)


def test_standard_adapter_equals_the_torch_oracle(models, qwen, tmp_path):
    """F32 adapter == oracle mapper on transformers' hidden states at the layers t(l); other layers
    give another adapter (so the comparison does check which layers the mapper is fed)."""
    from transformers import AutoModelForCausalLM

    from paw_lite.compiler.llama import LlamaModel

    d, state = models
    result = compile_report(SPEC, tmp_path / "s.paw", pseudo_program=PSEUDO, models=d, family="standard", adapter_type="f32")
    prog = result.program
    assert result.family.name == "standard" and result.summary()["family"] == "standard"

    with LlamaModel(qwen[1], vocab_only=True) as vocab:
        ids = encoder_token_ids(vocab, SPEC, PSEUDO, PREFIX_STEPS)
    assert result.encoder_tokens == len(ids)
    hf = AutoModelForCausalLM.from_pretrained(qwen[0], dtype=torch.float32).eval()
    with torch.no_grad():
        hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states  # hs[-1]: after the final norm
    assert len(hs) == 5
    want = oracle_mapper(state, [hs[t + 1][0, -PREFIX_STEPS:] for t in [0, 1, 3]], N_INTERP_LAYERS, TINY_BASES)

    arch, got = adapter_tensors(prog.adapter_gguf, tmp_path)
    assert arch == "qwen3" and sorted(got) == sorted(want) and len(got) == 2 * 7 * N_INTERP_LAYERS
    assert {kind for kind, _ in got.values()} == {"F32"}
    errors = {name: max_rel(got[name][1], want[name]) for name in want}
    assert max(errors.values()) < 1e-4, errors  # fp32 through llama.cpp vs transformers, then two mappers
    assert min(float(np.abs(w).max()) for w in want.values()) > 1e-3  # a real, non-zero program
    # the shapes of a Qwen3 LoRA: lora_a (r, d_in), lora_b (d_out, r), GQA k/v narrower than q
    assert got["blk.0.attn_q.weight.lora_b"][1].shape == (512, TINY_RANK)
    assert got["blk.0.attn_k.weight.lora_b"][1].shape == (256, TINY_RANK)
    assert got["blk.2.ffn_down.weight.lora_a"][1].shape == (TINY_RANK, 512)

    for layers in ([1, 2, 3], [0, 1, 2]):  # not the depth-ratio layers, or the last one before the norm
        other = oracle_mapper(state, [hs[t + 1][0, -PREFIX_STEPS:] for t in layers], N_INTERP_LAYERS, TINY_BASES)
        assert max(max_rel(got[n][1], other[n]) for n in other) > 1e-2, layers
    before_norm = oracle_mapper(state, [hs[1][0, -PREFIX_STEPS:], hs[2][0, -PREFIX_STEPS:], _pre_norm_last(hf, ids)],
                                N_INTERP_LAYERS, TINY_BASES)
    assert max(max_rel(got[n][1], before_norm[n]) for n in before_norm) > 1e-2


def _pre_norm_last(hf, ids):
    """The last decoder block's output before the final RMSNorm (what the mapper must NOT read)."""
    captured = {}
    handle = hf.model.layers[-1].register_forward_hook(lambda m, i, o: captured.setdefault("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hf(torch.tensor([ids]))
    handle.remove()
    out = captured["out"]
    return (out[0] if out.dim() == 3 else out)[-PREFIX_STEPS:]


def test_standard_bundle_q4_0(models, tmp_path, capsys):
    """Through the CLI with --family standard: the official members, the Standard template and
    meta.json, a Q4_0 qwen3 adapter within Q4_0's error of the F32 one."""
    d, _ = models
    pseudo = tmp_path / "pseudo.txt"
    pseudo.write_text(PSEUDO + "\n", encoding="utf-8")
    out = tmp_path / "std.paw"
    rc = main(["compile", SPEC, "-o", str(out), "--models", str(d), "--family", "standard", "--pseudo-program", str(pseudo),
               "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["family"] == "standard" and summary["runtime_id"] == "qwen3-0.6b-q6_k"
    assert [p["name"] for p in summary["phases"]] == ["check", "encoder", "mapper", "bundle"]

    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == sorted(MEMBERS)
        members = {name: zf.read(name) for name in zf.namelist()}
    meta = json.loads(members["meta.json"])
    template = members["prompt_template.txt"].decode()
    assert template == TEMPLATE and members["pseudo_program.txt"].decode() == PSEUDO
    assert {k: meta[k] for k in ("version", "spec", "interpreter", "runtime_id", "runtime_manifest_version", "lora_rank",
                                 "lora_alpha", "prefix_steps", "pseudo_program_strategy", "compiler_snapshot")} == {
        "version": 4, "spec": SPEC, "interpreter": "Qwen/Qwen3-0.6B", "runtime_id": "qwen3-0.6b-q6_k",
        "runtime_manifest_version": 1, "lora_rank": TINY_RANK, "lora_alpha": ALPHA, "prefix_steps": None,
        "pseudo_program_strategy": "provided", "compiler_snapshot": "paw-4b-qwen3-0.6b-tiny-test"}
    assert meta["program_id"] == content_program_id(members["adapter.gguf"], template, PSEUDO, SPEC)

    f32 = compile_report(SPEC, None, pseudo_program=PSEUDO, models=d, family="standard", adapter_type="f32").program
    _, want = adapter_tensors(f32.adapter_gguf, tmp_path)
    arch, got = adapter_tensors(members["adapter.gguf"], tmp_path)
    assert arch == "qwen3" and sorted(got) == sorted(want) and {k for k, _ in got.values()} == {"Q4_0"}
    for name, (_, w) in want.items():
        # Q4_0: per block of 32 along a row, step d = (largest magnitude) / 8 stored as f16; a value is
        # off by at most d (half a step, or a whole one where +8 clamps to +7), plus up to 8 steps' f16 rounding
        blocks = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
        err = np.abs(got[name][1].reshape(-1, 32) - w.reshape(-1, 32))
        ratio = float((err / (blocks / 8)).max())
        assert ratio <= 1 + 8 * 2.0 ** -11, (name, ratio)
        assert err.max() > 0  # quantized indeed


def test_the_compiler_meta_picks_the_family(models, tmp_path):
    """Without --family, the compiler meta.json given decides: a Standard meta gives a Standard program."""
    d, _ = models
    names = default_files("standard")
    prog = compile_report(SPEC, None, pseudo_program=PSEUDO, models=d, compiler_meta=d / names["compiler_meta"]).program
    assert prog.meta["interpreter"] == "Qwen/Qwen3-0.6B" and prog.template == TEMPLATE


def test_files_of_the_other_family_are_refused_with_the_fix(models, qwen, standard_interp, tmp_path, tiny_gguf):
    d, state = models
    names = default_files("standard")
    compact_meta = write_compiler_meta(tmp_path / "compact-meta.json")  # interpreter_model gpt2
    with pytest.raises(IncompatibleModelError, match=r"makes compact programs .* compile with --family compact"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, family="standard", compiler_meta=compact_meta)
    with pytest.raises(IncompatibleModelError, match=r"architecture 'gpt2' \(the compact family's interpreter\), but this "
                                                     r"compile makes standard programs"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, family="standard", interpreter=tiny_gguf)
    with pytest.raises(IncompatibleModelError, match=r"not a GPT-2 model, but this compile makes compact programs"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, family="compact", compiler=qwen[1], mapper=d / names["mapper"],
                compiler_meta=compact_meta, interpreter=standard_interp[0])  # the Qwen3 interpreter's HF folder
    # a Compact mapper shape read against this Standard mapper: its bases are named as Standard's
    gpt2_shape = MapperShape(hidden=256, interpreter=_gpt2_config(), rank=TINY_RANK, n_bases=TINY_BASES)
    assert gpt2_shape.modules == GPT2_MODULES
    with pytest.raises(InvalidFileError, match=r"missing \['A_bases_attn_c_proj'.*bases are for the modules of Standard"):
        Mapper.check(d / names["mapper"], gpt2_shape)
    # a mapper missing one module's bases is named, before any model runs
    broken = save_mapper(tmp_path / "broken.safetensors", {k: v for k, v in state.items() if k != "B_bases_v_proj"})
    with pytest.raises(InvalidFileError, match=r"missing \['B_bases_v_proj'\], unexpected \[\]"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, family="standard", mapper=broken)
    assert not (tmp_path / "x.paw").exists()


def _gpt2_config():
    from paw_lite.gpt2_layout import GPT2Config

    return GPT2Config(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_ff=256, eps=1e-5)


def test_convert_mapper_for_a_standard_compiler(standard_interp, tmp_path, capsys):
    """`paw-lite convert mapper` with a Standard meta.json and the Qwen3 interpreter GGUF: the shape
    comes from that interpreter (3 layers x 7 modules); the same file against the GPT-2 shape fails."""
    from transformers import AutoConfig

    dims = module_dims(AutoConfig.from_pretrained(standard_interp[0]))
    state = random_standard_mapper(256, N_INTERP_LAYERS, dims, TINY_RANK, TINY_BASES, seed=4)
    src = tmp_path / "lora_mapper.pt"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, src)
    meta = write_compiler_meta(tmp_path / "meta.json", **STANDARD_META)
    out = tmp_path / "mapper.safetensors"
    rc = main(["convert", "mapper", str(src), "-o", str(out), "--meta", str(meta), "--hidden", "256",
               "--interpreter", str(standard_interp[1]), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["interpreter_layers"] == N_INTERP_LAYERS and out.exists()
    from safetensors.numpy import load_file

    assert {k: v.tolist() for k, v in load_file(str(out)).items()} == {k: v.tolist() for k, v in state.items()}
    gpt2_meta = write_compiler_meta(tmp_path / "gpt2-meta.json")
    rc = main(["convert", "mapper", str(src), "-o", str(tmp_path / "x.safetensors"), "--meta", str(gpt2_meta),
               "--hidden", "256", "--json"])
    assert rc == 2 and "bases are for the modules of Standard" in json.loads(capsys.readouterr().out)["error"]


# -- running what was compiled ------------------------------------------------------------------------


EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
INPUTS = ["disk usage at 99% on /var", "user alice logged in", "  ünïcödé ✓"]


def hf_greedy_qwen(model, prompt_ids: list[int], max_new: int) -> list[int]:
    """transformers' greedy generate, without the prompt and the EOS."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=list(EOS_IDS), pad_token_id=EOS_IDS[1])
    ids = out[0, len(prompt_ids):].tolist()
    return next((ids[:i] for i, t in enumerate(ids) if t in EOS_IDS), ids)


def test_cli_run_test_and_peft_of_a_standard_program(models, standard_interp, tmp_path, capsys):
    """`compile --family standard --run --test --peft` (the generated pseudo-program path): the program
    runs in paw_lite to transformers + PEFT's greedy output (its PEFT export on the HF interpreter), and
    llama.cpp loads its Q4_0 adapter.gguf on the interpreter GGUF to the same tokens (or a near-tie)."""
    import paw_lite
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llama_oracle import assert_same_or_near_tie, llama_greedy

    d, _ = models
    interp = d / default_files("standard")["interpreter"]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"input": t, "expected": "ALERT"}) + "\n" for t in INPUTS[1:]), encoding="utf-8")

    out, peft_dir = tmp_path / "gen.paw", tmp_path / "peft"
    rc = main(["compile", SPEC, "-o", str(out), "--models", str(d), "--family", "standard", "--max-new-tokens", "24",
               "--run", INPUTS[0], "--test", str(cases), "--peft", str(peft_dir), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["pseudo_program_strategy"] == "examples" and summary["family"] == "standard"
    assert [p["name"] for p in summary["phases"]] == ["check", "pseudo-program", "encoder", "mapper", "bundle"]
    assert summary["test"]["interpreter"]["path"] == str(interp)

    peft_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert sorted(peft_config["target_modules"]) == sorted(SUFFIX_TO_GGUF) and peft_config["r"] == TINY_RANK
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(standard_interp[0], dtype=torch.float32),
                                   peft_dir).eval()
    adapter = tmp_path / "adapter.gguf"
    with zipfile.ZipFile(out) as zf:
        adapter.write_bytes(zf.read("adapter.gguf"))
    with paw_lite.function(out, base_model=interp, cache_dir=tmp_path / "cache") as fn:
        assert summary["run"]["output"] == fn(INPUTS[0])
        assert [c["output"] for c in summary["test"]["cases"]] == [fn(t) for t in INPUTS[1:]]
        for text in INPUTS:
            ids = fn.prompt_ids(text)
            ours = fn.generate_ids(text, max_tokens=12)
            assert ours and ours == hf_greedy_qwen(hf, ids, 12), text
            theirs = llama_greedy(standard_interp[1], adapter, ids, 12, N_CTX, eos=EOS_IDS[0])
            assert_same_or_near_tie(ours, theirs, ids, hf, tol=1e-2, eos=EOS_IDS[0])


# -- the official SDK's importer ------------------------------------------------------------------------


def test_the_official_importer_accepts_a_standard_bundle(models, tmp_path, monkeypatch):
    """programasweights 0.4.14's importer (what programasweights.function("x.paw") runs), offline."""
    from programasweights import cache as sdk_cache
    from programasweights.local_program import import_local_program

    home = tmp_path / "sdk"
    monkeypatch.setenv("PAW_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("PAW_API_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("PAW_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(home))
    d, _ = models
    bundle = compile(SPEC, tmp_path / "std.paw", pseudo_program=PSEUDO, models=d, family="standard")
    with zipfile.ZipFile(bundle) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    meta = json.loads(members["meta.json"])
    imported = import_local_program(bundle)
    assert imported.parent == home / "cache" / "local_programs"
    assert {p.name: p.read_bytes() for p in imported.iterdir()} == members
    assert sdk_cache.validate_program_assets_dir(imported, meta["program_id"])
    assert sdk_cache.is_valid_adapter_file(imported / "adapter.gguf")
    manifest = sdk_cache.get_offline_runtime_manifest(meta)
    assert manifest["runtime_id"] == "qwen3-0.6b-q6_k" and manifest["interpreter"] == "Qwen/Qwen3-0.6B"


# -- full size --------------------------------------------------------------------------------------------


def test_the_mapper_at_full_size():
    """paw-4b-qwen3-0.6b's shapes (Qwen3-4B width 2560, Qwen3-0.6B's 28 layers x 7 modules, rank 64, 64
    bases): a 25,088-wide coefficient head, and random weights give 392 LoRA tensors of the right
    shapes, 40.4M (38.5 Mi) parameters, a 21.7 MiB Q4_0 adapter.gguf; one layer checked against the oracle."""
    from paw_lite.convert.mapper import QWEN3_06B
    from paw_lite.lora import adapter_gguf_bytes

    shape = MapperShape(hidden=2560, interpreter=QWEN3_06B, rank=64, n_bases=64)
    expected = shape.expected(2560)
    assert shape.n_coefficients == 25_088 == 28 * 7 * 64 * 2
    assert expected["coeff_head.weight"] == (25_088, 2560) and expected["trunk.0.weight"] == (2560, 2560)
    dims = {"q_proj": (1024, 2048), "k_proj": (1024, 1024), "v_proj": (1024, 1024), "o_proj": (2048, 1024),
            "gate_proj": (1024, 3072), "up_proj": (1024, 3072), "down_proj": (3072, 1024)}
    for suffix, (d_in, d_out) in dims.items():
        assert expected[f"A_bases_{suffix}"] == (64, 64, d_in) and expected[f"B_bases_{suffix}"] == (64, d_out, 64)
    assert len(expected) == 4 + 14

    state = random_standard_mapper(2560, 28, dims, 64, 64, seed=2)
    hs = np.random.default_rng(3).standard_normal((28, PREFIX_STEPS, 2560)).astype(np.float32)
    got = Mapper(state, shape, "full-size")(hs)
    assert len(got) == 28 * 7 * 2
    n_params = 28 * 64 * sum(d_in + d_out for d_in, d_out in dims.values())
    assert sum(a.size for a in got.values()) == n_params == 40_370_176  # 38.5 Mi
    assert got["blk.27.attn_q.weight.lora_a"].shape == (64, 1024) and got["blk.27.attn_q.weight.lora_b"].shape == (2048, 64)
    assert got["blk.0.ffn_down.weight.lora_a"].shape == (64, 3072) and got["blk.0.ffn_down.weight.lora_b"].shape == (1024, 64)
    # the oracle on layer 27 only (the whole oracle would double the memory)
    want = oracle_mapper({**state, "coeff_head.weight": state["coeff_head.weight"][-7 * 64 * 2:],
                          "coeff_head.bias": state["coeff_head.bias"][-7 * 64 * 2:]}, list(hs), 1, 64)
    for name, w in want.items():
        assert max_rel(got[name.replace("blk.0.", "blk.27.")], w) < 1e-4, name
    size = len(adapter_gguf_bytes(got, 16.0, "q4_0", arch="qwen3"))
    assert n_params * 18 // 32 < size < n_params * 18 // 32 + 100_000, size  # Q4_0: 18 bytes per 32 values; 21.7 MiB
