"""The compiler end to end on tiny models: `paw-lite compile` writes a bundle that the NumPy
interpreter runs, that llama.cpp loads with the same greedy output, whose PEFT export gives the same
output in transformers, and whose adapter equals the same pipeline computed with transformers and
PyTorch. Plus the pseudo-program budget loop and the error paths."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from gguf import GGUFReader

from oracles import oracle
import paw_lite
from conftest import hf_greedy
from compiler_fixtures import (ALPHA, PREFIX_STEPS, TINY_BASES, TINY_RANK, max_rel, random_mapper_state, save_mapper,
                               tiny_qwen, torch_mapper, write_compiler_meta)
from paw_lite.cli import main
from paw_lite.compiler import compile, compile_and_load, compile_report
from paw_lite.compiler.encoder import depth_layers, encoder_token_ids
from paw_lite.compiler.prompts import examples_prompt, interpreter_template
from paw_lite.compiler.pseudo import SHORTER_NOTE, fit_to_budget
from paw_lite.errors import ContextOverflowError, IncompatibleModelError, ModelNotFoundError, PawError
from paw_lite.program import MEMBERS, Program, content_program_id

oracle("llama_cpp", "transformers", "peft")
torch = oracle("torch")
pytestmark = pytest.mark.llama

SPEC = "Classify a log line as ALERT when it reports a failure, else QUIET."
PSEUDO = ("[PSEUDO_PROGRAM]\nTask: Answer ALERT for failures, QUIET otherwise.\n\nExamples:\n"
          "Input: disk full on /var\nOutput: ALERT\n\nInput: user logged in\nOutput: QUIET\n[END_PSEUDO_PROGRAM]")
INPUTS = ["disk usage at 99% on /var", "user alice logged in", "  ünïcödé ✓"]
N_CTX = 512  # the interpreter's context: room for a pseudo-program under the 256-token input reserve


# -- the budget loop (no model) ---------------------------------------------------------------------


class FakeGenerator:
    def __init__(self, outputs):
        self.outputs, self.messages = list(outputs), []

    def __call__(self, message):
        self.messages.append(message)
        text = self.outputs.pop(0)
        return text, len(text.split())


def test_budget_first_attempt_fits():
    gen = FakeGenerator(["[PSEUDO_PROGRAM] a b c [END_PSEUDO_PROGRAM]"])
    result = fit_to_budget(SPEC, gen, lambda t: len(t.split()), limit=5)
    assert (result.attempts, result.n_tokens, result.text) == (1, 5, "[PSEUDO_PROGRAM] a b c [END_PSEUDO_PROGRAM]")
    assert gen.messages == [examples_prompt(SPEC)]


def test_budget_regenerates_with_a_shorter_note_twice():
    gen = FakeGenerator(["w " * 20, "w " * 12, "w w w"])
    result = fit_to_budget(SPEC, gen, lambda t: len(t.split()), limit=4)
    assert result.attempts == 3 and result.text == "w w w" and result.generated_tokens == 35
    assert gen.messages[0] == examples_prompt(SPEC)
    assert gen.messages[1] == examples_prompt(SPEC) + SHORTER_NOTE.format(n_tokens=20, limit=4)
    assert gen.messages[2] == examples_prompt(SPEC) + SHORTER_NOTE.format(n_tokens=12, limit=4)


def test_budget_fails_clearly_after_two_regenerations():
    gen = FakeGenerator(["w " * 20, "w " * 12, "w " * 9, "w"])
    with pytest.raises(ContextOverflowError, match=r"20, 12, 9 interpreter tokens in 3 attempts; at most 4 fit.*--pseudo-program"):
        fit_to_budget(SPEC, gen, lambda t: len(t.split()), limit=4)
    assert len(gen.messages) == 3


def test_budget_refuses_an_empty_pseudo_program():
    with pytest.raises(PawError, match="empty pseudo-program"):
        fit_to_budget(SPEC, FakeGenerator([""]), lambda t: 0, limit=4)


# -- tiny models ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Prompt-state and prefix caches go to a per-test folder, never the user's cache."""
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, vocab_dir):
    return tiny_qwen(tmp_path_factory, vocab_dir)


@pytest.fixture(scope="module")
def interp(tmp_path_factory, hf_tokenizer_dir):
    """A tiny random GPT-2 interpreter (HF folder, F32 GGUF) with a 512-position table."""
    from conftest import make_hf_gpt2
    from paw_lite.convert.gpt2 import convert_hf_gpt2

    root = tmp_path_factory.mktemp("interp")
    hf = make_hf_gpt2(root / "hf", hf_tokenizer_dir, n_ctx=N_CTX)
    return hf, convert_hf_gpt2(hf, root / "tiny-gpt2-f32.gguf", "f32")


@pytest.fixture(scope="module")
def models(tmp_path_factory, qwen, interp):
    """A models directory laid out as `paw-lite models pull` leaves it (default file names)."""
    from paw_lite.base_model import read_header
    from paw_lite.compiler.config import DEFAULT_FILES

    d = tmp_path_factory.mktemp("models")
    config, _ = read_header(interp[1])
    state = random_mapper_state(256, config, TINY_RANK, TINY_BASES, seed=3)
    save_mapper(d / DEFAULT_FILES["mapper"], state)
    write_compiler_meta(d / DEFAULT_FILES["compiler_meta"])
    for key, src in (("compiler", qwen[1]), ("pseudo_compiler", qwen[1]), ("interpreter", interp[1])):
        (d / DEFAULT_FILES[key]).symlink_to(src)
    return d, state, config


def test_pseudo_program_generation_equals_transformers_greedy(qwen):
    """Greedy decoding through llama.cpp (F32 weights) equals transformers' generate on the same prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from paw_lite.compiler.llama import LlamaModel
    from paw_lite.compiler.pseudo import GreedyGenerator

    tok = AutoTokenizer.from_pretrained(qwen[0])
    hf = AutoModelForCausalLM.from_pretrained(qwen[0], dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": examples_prompt(SPEC)}], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=[151643, 151645], pad_token_id=151643)
    want = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    with LlamaModel(qwen[1]) as model, GreedyGenerator(model, model, max_new_tokens=24) as generate:
        text, n = generate(examples_prompt(SPEC))
        assert text == want and n == len(out[0]) - len(ids) - int(out[0, -1] in (151643, 151645))
        # a second prompt sharing the first one's beginning reuses its cache and still matches a fresh run
        again, _ = generate(examples_prompt(SPEC) + " Be brief.")
    with LlamaModel(qwen[1]) as model, GreedyGenerator(model, model, max_new_tokens=24) as fresh:
        assert again == fresh(examples_prompt(SPEC) + " Be brief.")[0]


def test_pseudo_program_generation_stops_where_transformers_does(qwen, monkeypatch):
    """transformers stops Qwen3 at <|im_end|> or <|endoftext|> only; llama.cpp's end-of-generation set
    also holds <|fim_pad|> (151662), <|repo_name|> and <|file_sep|>, which must not stop a pseudo-program."""
    from paw_lite.compiler.llama import LlamaContext, LlamaModel
    from paw_lite.compiler.pseudo import GreedyGenerator

    with LlamaModel(qwen[1]) as model:
        picks = iter([151662, 151664, 30, 151643, 40])

        def one_hot(self, i=-1):
            out = np.zeros(model.n_vocab, np.float32)
            out[next(picks)] = 1.0
            return out

        monkeypatch.setattr(LlamaContext, "logits", one_hot)
        with GreedyGenerator(model, model, max_new_tokens=24) as generate:
            assert generate.stop_ids == {151643, 151645}
            _, n = generate(examples_prompt(SPEC))
    assert n == 3 and next(picks) == 40  # the two FIM tokens and id 30 generated, stopped at 151643


def test_prompt_state_cache(qwen, tmp_path, caplog):
    """The spec-independent part of the pseudo compiler's prompt is evaluated once and restored from
    disk afterwards, with the same output; a corrupted file is detected and rebuilt."""
    from paw_lite.compiler.encoder import chat_prompt
    from paw_lite.compiler.llama import LlamaModel
    from paw_lite.compiler.prompt_cache import PromptStateCache, spec_independent_prefix
    from paw_lite.compiler.pseudo import GreedyGenerator

    specs = [SPEC, "  leading spaces", "\n\nnewlines first", "{spec} and <|im_end|>", "日本語の仕様"]
    with LlamaModel(qwen[1]) as model:
        def prompt_ids(spec):
            return model.tokenize(chat_prompt(model, examples_prompt(spec)), special=True)

        fixed = spec_independent_prefix(prompt_ids)
        assert len(fixed) > 0.8 * len(prompt_ids("x"))
        assert all(prompt_ids(spec)[:len(fixed)] == fixed for spec in specs)

        def run(cache):
            with GreedyGenerator(model, model, max_new_tokens=12, fixed_prefix=fixed, state_cache=cache) as generate:
                return generate(examples_prompt(SPEC))

        cache = PromptStateCache(tmp_path / "states", qwen[1], "f16")
        without = run(None)
        assert not cache.path(fixed).exists()
        assert run(cache) == without and cache.path(fixed).exists()  # built, saved
        assert cache.load(fixed) is not None
        with caplog.at_level("INFO", logger="paw_lite.compiler"):
            assert run(cache) == without  # restored
        assert "restored from" in caplog.text
        data = bytearray(cache.path(fixed).read_bytes())
        data[-100] ^= 0xFF
        cache.path(fixed).write_bytes(bytes(data))
        caplog.clear()
        assert run(cache) == without
        assert "checksum mismatch" in caplog.text and cache.load(fixed) is not None  # rebuilt
        other = PromptStateCache(tmp_path / "states", qwen[0] / "config.json", "f16")  # another model file
        assert other.path(fixed) != cache.path(fixed)


def test_cli_compile_end_to_end(models, interp, tmp_path, capsys):
    """Generated pseudo-program, Q4_0 adapter, PEFT export and a first run, through the CLI."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from llama_oracle import assert_same_or_near_tie, llama_greedy

    d, _, config = models
    out = tmp_path / "prog.paw"
    rc = main(["compile", SPEC, "-o", str(out), "--models", str(d), "--peft", str(tmp_path / "peft"),
               "--run", INPUTS[0], "--max-new-tokens", "32", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert [p["name"] for p in summary["phases"]] == ["check", "pseudo-program", "encoder", "mapper", "bundle"]
    assert all(p["seconds"] > 0 and p["peak_rss_mb"] > 0 for p in summary["phases"])
    assert summary["pseudo_program_strategy"] == "examples" and summary["pseudo_attempts"] >= 1
    assert summary["runtime_id"] == "gpt2-q8_0" and summary["peft"] == str(tmp_path / "peft")

    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == sorted(MEMBERS)
    prog = Program.load(out)
    meta = prog.meta
    assert prog.pseudo_program == summary["pseudo_program"] and prog.pseudo_program == prog.pseudo_program.strip()
    assert prog.template == interpreter_template(prog.pseudo_program)
    assert meta["program_id"] == content_program_id(prog.adapter_gguf, prog.template, prog.pseudo_program, SPEC)
    assert {k: meta[k] for k in ("version", "spec", "interpreter", "runtime_id", "runtime_manifest_version", "lora_rank",
                                 "lora_alpha", "prefix_steps", "pseudo_program_strategy", "compiler_snapshot")} == {
        "version": 4, "spec": SPEC, "interpreter": "gpt2", "runtime_id": "gpt2-q8_0", "runtime_manifest_version": 1,
        "lora_rank": TINY_RANK, "lora_alpha": ALPHA, "prefix_steps": PREFIX_STEPS, "pseudo_program_strategy": "examples",
        "compiler_snapshot": "tiny-test"}
    assert len(meta["compiler_fingerprint"]) == 16 and meta["created_at"].endswith("Z")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert type(meta["lora_alpha"]) is int and type(peft_config["lora_alpha"]) is int  # 16, as published: not 16.0
    adapter_path = tmp_path / "adapter.gguf"
    adapter_path.write_bytes(prog.adapter_gguf)
    reader = GGUFReader(adapter_path)  # gguf-py, an independent reader
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_0"} and len(reader.tensors) == 2 * 4 * config.n_layer

    hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(interp[0]), tmp_path / "peft").eval()
    with paw_lite.function(out, base_model=interp[1], cache_dir=tmp_path / "cache") as fn:
        assert summary["run"]["output"] == fn(INPUTS[0])
        for text in INPUTS:
            ids = fn.prompt_ids(text)
            ours = fn.generate_ids(text, max_tokens=16)
            assert ours, "the program should write something"
            assert ours == hf_greedy(hf, ids, 16), text
            assert_same_or_near_tie(ours, llama_greedy(interp[1], adapter_path, ids, 16, N_CTX), ids, hf, tol=1e-2)


def test_compile_matches_transformers_and_torch_pipeline(models, qwen, tmp_path):
    """With a given pseudo-program and an F32 adapter, the adapter equals hidden states from
    transformers fed to the PyTorch mapper; compiling again gives the same bytes and program id."""
    from transformers import AutoModelForCausalLM

    from paw_lite.compiler.llama import LlamaModel

    d, state, config = models
    pseudo_file = tmp_path / "pseudo.txt"
    pseudo_file.write_text("\n" + PSEUDO + "\n\n", encoding="utf-8")
    out = compile(SPEC, tmp_path / "a.paw", pseudo_program=pseudo_file.read_text(), models=d, adapter_type="f32")
    prog = Program.load(out)
    assert prog.pseudo_program == PSEUDO and prog.meta["pseudo_program_strategy"] == "provided"

    with LlamaModel(qwen[1], vocab_only=True) as vocab:
        ids = encoder_token_ids(vocab, SPEC, PSEUDO, PREFIX_STEPS)
    layers = depth_layers(4, config.n_layer)
    assert layers == [1, 3]
    hf = AutoModelForCausalLM.from_pretrained(qwen[0], dtype=torch.float32).eval()
    with torch.no_grad():
        hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    want = torch_mapper(state, [hs[t + 1][0, -PREFIX_STEPS:] for t in layers], config.n_layer, TINY_BASES)

    adapter_path = tmp_path / "adapter.gguf"
    adapter_path.write_bytes(prog.adapter_gguf)
    got = {t.name: np.asarray(t.data).reshape(want[t.name].shape) for t in GGUFReader(adapter_path).tensors}
    assert sorted(got) == sorted(want)
    errors = {name: max_rel(got[name], want[name]) for name in want}
    assert max(errors.values()) < 1e-4, errors
    assert min(float(np.abs(w).max()) for w in want.values()) > 1e-3  # a real, non-zero program

    # The CLI with --pseudo-program FILE, and the HF tokenizer folder in place of the GGUF's vocabulary,
    # give the same program: same adapter bytes, same content-addressed id.
    rc = main(["compile", SPEC, "-o", str(tmp_path / "b.paw"), "--models", str(d), "--pseudo-program", str(pseudo_file),
               "--adapter-type", "f32", "--compiler-tokenizer", str(qwen[0])])
    assert rc == 0
    again = Program.load(tmp_path / "b.paw")
    assert again.adapter_gguf == prog.adapter_gguf and again.program_id == prog.program_id
    assert again.meta["created_at"] and again.meta["pseudo_program_strategy"] == "provided"


def test_compile_and_load_runs_the_program(models, interp, tmp_path):
    d, _, _ = models
    with compile_and_load(SPEC, pseudo_program=PSEUDO, models=d, cache_dir=tmp_path / "cache") as fn:
        assert fn.spec == SPEC and fn.pseudo_program == PSEUDO
        first = fn(INPUTS[0], max_tokens=8)
    with paw_lite.function(compile(SPEC, tmp_path / "p.paw", pseudo_program=PSEUDO, models=d), base_model=interp[1]) as fn2:
        assert fn2(INPUTS[0], max_tokens=8) == first


# -- errors -------------------------------------------------------------------------------------------


def test_a_failed_run_says_the_program_was_written(models, tmp_path, capsys):
    d, _, _ = models
    pseudo, out = tmp_path / "pseudo.txt", tmp_path / "p.paw"
    pseudo.write_text(PSEUDO, encoding="utf-8")
    rc = main(["compile", SPEC, "-o", str(out), "--models", str(d), "--pseudo-program", str(pseudo),
               "--run", "word " * N_CTX, "--json"])
    error = json.loads(capsys.readouterr().out)
    assert rc == 2 and error["type"] == "ContextOverflowError"
    assert error["error"].startswith(f"wrote {out}, but running it on the --run text failed: ")
    assert Program.load(out).pseudo_program == PSEUDO


def test_missing_models_are_listed_in_one_error(tmp_path, capsys):
    rc = main(["compile", SPEC, "-o", str(tmp_path / "x.paw"), "--models", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    for what in ("compiler (", "mapper (", "compiler-meta (", "pseudo-compiler (", "interpreter (", "paw-lite models pull"):
        assert what in err
    # with a pseudo-program given, the pseudo compiler is not needed
    with pytest.raises(ModelNotFoundError) as info:
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=tmp_path)
    assert "pseudo-compiler (" not in str(info.value) and "compiler (" in str(info.value)
    assert not (tmp_path / "x.paw").exists()


def test_unreadable_spec_and_pseudo_program_files_are_named_with_the_reason(tmp_path, capsys):
    """The system's reason, not `[Errno 2] No such file or directory: '...'` repeating the path."""
    out = tmp_path / "x.paw"
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfab\xffc")
    (tmp_path / "a-folder").mkdir()
    for argv, problem in ((["@" + str(tmp_path / "nospec.txt")], "nospec.txt: cannot read the spec: No such file or directory"),
                          (["@" + str(tmp_path / "a-folder")], "a-folder: cannot read the spec: Is a directory"),
                          (["@" + str(tmp_path / "bom.txt")], "bom.txt: cannot read the spec: not UTF-8 text (byte 5); save it as UTF-8"),
                          ([SPEC, "--pseudo-program", str(tmp_path / "bom.txt")],
                           "bom.txt: cannot read the pseudo-program: not UTF-8 text (byte 5); save it as UTF-8")):
        assert main(["compile", *argv, "-o", str(out)]) == 2
        assert capsys.readouterr().err == f"paw-lite: error: {tmp_path}/{problem}\n"
    assert not out.exists()


def test_a_folder_given_as_a_model_file_is_named_as_a_folder(models, tmp_path, capsys):
    d, _, _ = models
    (tmp_path / "pseudo.txt").write_text(PSEUDO, encoding="utf-8")
    folder = tmp_path / "compiler-folder"
    folder.mkdir()
    assert main(["compile", SPEC, "-o", str(tmp_path / "x.paw"), "--models", str(d), "--compiler", str(folder),
                 "--pseudo-program", str(tmp_path / "pseudo.txt")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the check phase's progress line
    assert last == f"paw-lite: error: {folder}: is a folder, not a model file; pass the .gguf file itself"


def test_a_missing_llama_cpp_is_named_before_missing_models(tmp_path, monkeypatch):
    """A run-only install (no llama-cpp-python) learns that first, not after fetching the models."""
    import sys

    from paw_lite.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"llama_cpp is needed .*paw-lite\[compile\]"):
        compile(SPEC, tmp_path / "x.paw", models=tmp_path)
    assert not (tmp_path / "x.paw").exists()


def test_pseudo_program_that_does_not_fit_is_refused(models, tmp_path):
    d, _, _ = models
    with pytest.raises(ContextOverflowError, match=r"at most 256 fit \(context 512 minus 256"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program="word " * 300, models=d)
    with pytest.raises(IncompatibleModelError, match="INPUT_PLACEHOLDER"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program="Task: {INPUT_PLACEHOLDER}", models=d)
    assert not list(tmp_path.iterdir())


def test_mapper_that_does_not_fit_fails_before_any_generation(models, tmp_path, qwen, interp):
    d, state, config = models
    bad = dict(state, **{"trunk.0.weight": np.zeros((256, 128), np.float32)})
    mapper = save_mapper(tmp_path / "bad.safetensors", bad)
    calls = []
    with pytest.raises(IncompatibleModelError, match=r"trunk.0.weight has shape \(256, 128\), expected \(256, 256\)"):
        compile_report(SPEC, tmp_path / "x.paw", models=d, mapper=mapper, progress=calls.append)
    assert calls == ["check ..."]  # failed inside the first phase
    assert not (tmp_path / "x.paw").exists()


def test_tokenizer_of_another_model_is_refused(models, interp, tmp_path):
    from transformers import GPT2TokenizerFast

    d, _, _ = models
    GPT2TokenizerFast.from_pretrained(interp[0]).save_pretrained(tmp_path / "gpt2-tok")
    with pytest.raises(PawError, match="'<\\|im_start\\|>' is not a token of this tokenizer"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, compiler_tokenizer=tmp_path / "gpt2-tok")
    assert not (tmp_path / "x.paw").exists()


def test_a_peft_folder_with_other_files_is_refused_before_the_compile(models, tmp_path, capsys):
    """The adapter replaces its folder as a whole: a folder holding anything else is refused, not wiped."""
    d, _, _ = models
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    phases = []
    with pytest.raises(PawError, match=r"peft .*project holds other files \(notes.txt, src\); the adapter replaces"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, peft=project, progress=phases.append)
    assert phases == [] and sorted(p.name for p in project.iterdir()) == ["notes.txt", "src"]
    assert not (tmp_path / "x.paw").exists()
    rc = main(["compile", SPEC, "-o", str(tmp_path / "x.paw"), "--models", str(d), "--peft", str(project)])
    assert rc == 2 and "--peft" in capsys.readouterr().err and (project / "notes.txt").exists()
    # an earlier adapter is replaced
    old = tmp_path / "old-peft"
    old.mkdir()
    (old / "adapter_config.json").write_text("{}")
    (old / "README.md").write_text("PEFT's own")
    compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, peft=old)
    assert sorted(p.name for p in old.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_api_arguments_are_checked_before_the_compile(models, tmp_path):
    d, _, _ = models
    phases = []
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(PawError, match="out= .*a-folder is a folder; give the path of a file to write"):
        compile(SPEC, folder, pseudo_program=PSEUDO, models=d, progress=phases.append)
    with pytest.raises(TypeError, match="out is the path of the .paw to write"):
        compile(SPEC, None, pseudo_program=PSEUDO, models=d)
    with pytest.raises(TypeError, match=r"unknown option\(s\) max_tokens; the options are max_new_tokens"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, max_tokens=3)
    with pytest.raises(TypeError, match=r"pseudo_program must be str, not PosixPath; pass the text"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=tmp_path / "pseudo.txt", models=d)
    (tmp_path / "pseudo.txt").write_text(PSEUDO)
    with pytest.raises(PawError, match=r"the pseudo-program is one line, '.*pseudo.txt', which names a file: .*"
                                       r"in Python pass Path\('.*pseudo.txt'\).read_text\(\)"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=str(tmp_path / "pseudo.txt"), models=d)
    (tmp_path / "pp.txt").write_text(str(tmp_path / "pseudo.txt"))  # the CLI reads the file: one line, no traceback
    assert main(["compile", SPEC, "--pseudo-program", str(tmp_path / "pp.txt"), "-o", str(tmp_path / "x.paw"),
                 "--models", str(d)]) == 2
    with pytest.raises(TypeError, match="spec must be str, not bytes"):
        compile(SPEC.encode(), tmp_path / "x.paw", pseudo_program=PSEUDO, models=d)
    with pytest.raises(PawError, match="the spec is not valid Unicode"):
        compile(SPEC + "\udfff", tmp_path / "x.paw", pseudo_program=PSEUDO, models=d)
    for option, value in (("n_threads", -4), ("max_new_tokens", "32"), ("n_ubatch", 1.5), ("input_reserve", -1)):
        with pytest.raises(PawError, match=f"{option} must be an integer >= "):
            compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, **{option: value})
    with pytest.raises(PawError, match="input_reserve=600 leaves no room .* 512-token context of .*gpt2-q8_0.gguf; lower it"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, input_reserve=600, progress=phases.append)
    assert phases and not any("pseudo-program" in p or "encoder" in p for p in phases)  # stopped in the check
    with pytest.raises(PawError, match="runtime_id '../x' is not a valid model file name"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, runtime_id="../x")
    assert not (tmp_path / "x.paw").exists()


def test_a_rank_q4_0_cannot_hold_is_refused_in_the_check(models, tmp_path):
    d, _, _ = models
    meta = write_compiler_meta(tmp_path / "meta.json", rank=16)
    with pytest.raises(IncompatibleModelError, match="lora_rank 16 is not a multiple of 32.*adapter type f16 or f32"):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, compiler_meta=meta)


def test_an_interpreter_file_name_that_cannot_be_a_runtime_id_is_refused(models, interp, tmp_path):
    d, _, _ = models
    odd = tmp_path / "gpt2 f16 (converted).gguf"
    odd.symlink_to(interp[1])
    with pytest.raises(PawError, match=r"would name its interpreter 'gpt2 f16 \(converted\)'.*or pass runtime_id="):
        compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, interpreter=odd)
    path = compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, interpreter=odd, runtime_id="gpt2-mine")
    assert Program.load(path).meta["runtime_id"] == "gpt2-mine"


def test_the_published_interpreter_under_another_name_is_still_named_gpt2_q8_0(models, interp, tmp_path, monkeypatch):
    """Programs name the runtime they need; a renamed copy of the published file named its copy's
    name, which `paw-lite run` then asked for and `models pull` could not fetch."""
    from paw_lite.models_dir import manifest as md_manifest
    from paw_lite.base_model import file_sha256

    d, _, _ = models
    renamed = tmp_path / "my-gpt2.gguf"
    renamed.write_bytes(interp[1].read_bytes())
    data = json.loads(md_manifest.MANIFEST_PATH.read_text())
    entry = next(e for e in data["files"] if e["role"] == "interpreter")
    entry["bytes"], entry["sha256"] = renamed.stat().st_size, file_sha256(renamed)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    path = compile(SPEC, tmp_path / "x.paw", pseudo_program=PSEUDO, models=d, interpreter=renamed)
    assert Program.load(path).meta["runtime_id"] == "my-gpt2"  # not the pinned file: its own name
    monkeypatch.setattr(md_manifest, "MANIFEST_PATH", tmp_path / "manifest.json")
    path = compile(SPEC, tmp_path / "y.paw", pseudo_program=PSEUDO, models=d, interpreter=renamed)
    assert Program.load(path).meta["runtime_id"] == "gpt2-q8_0"


def test_compile_and_load_keeps_every_cache_in_cache_dir(models, tmp_path, private_cache):
    d, _, _ = models
    with compile_and_load(SPEC, models=d, max_new_tokens=16, cache_dir=str(tmp_path / "mine")) as fn:
        assert fn.spec == SPEC
    assert (tmp_path / "mine" / "compiler").is_dir()
    assert not (private_cache / "compiler").exists()


def test_spec_and_pseudo_program_files_may_start_with_a_bom(models, tmp_path, capsys):
    """... and end with an editor's line ending, which is not part of the spec either (kept, it
    reached the prompts: another program than the spec typed inline)."""
    d, _, _ = models
    (tmp_path / "spec.txt").write_bytes(("\ufeff" + SPEC + "\r\n").encode())
    (tmp_path / "pseudo.txt").write_text("\ufeff" + PSEUDO, encoding="utf-8")
    out = tmp_path / "x.paw"
    assert main(["compile", "@" + str(tmp_path / "spec.txt"), "-o", str(out), "--models", str(d),
                 "--pseudo-program", str(tmp_path / "pseudo.txt")]) == 0
    prog = Program.load(out)
    assert prog.spec == SPEC and prog.pseudo_program == PSEUDO.strip()


def test_on_a_terminal_compile_shows_the_pseudo_program_and_encoder_bars(models, tmp_path, monkeypatch):
    """The bars are off when stderr is not a terminal (as in every other test): here it claims to
    be one, so the pseudo-program bar and then the encoder's percentage bar actually draw."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    d, _, _ = models
    assert main(["compile", SPEC, "-o", str(tmp_path / "x.paw"), "--models", str(d), "--max-new-tokens", "16"]) == 0
    drawn = err.getvalue()
    assert "pseudo-program tokens" in drawn
    assert "encoder: 100%" in drawn
