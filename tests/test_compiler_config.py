"""Where the compiler finds its files, and its meta.json (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler_fixtures import write_compiler_meta
from paw_lite.compiler.config import DEFAULT_FILES, FAMILY_FILE_NAMES, CompilerMeta, ModelFiles, default_files
from paw_lite.errors import IncompatibleModelError, InvalidFileError, ModelNotFoundError
from paw_lite.families import COMPACT, STANDARD

MANIFEST = Path(__file__).resolve().parents[1] / "models" / "manifest.json"


def test_file_names_are_the_models_manifest_names():
    if not MANIFEST.exists():
        pytest.skip("models/manifest.json is not in this checkout")
    entries = {(e["family"], e["role"]): e for e in json.loads(MANIFEST.read_text())["files"]}
    for family, names in FAMILY_FILE_NAMES.items():
        for role, (name, quant) in names.items():
            entry = entries.get((family, role)) or entries[("both", role)]
            assert entry["name"] == name and entry.get("default_quant") == quant, (family, role)
    assert len(entries) == 9  # 4 files of each family, and the pseudo compiler both use


def test_standard_files_are_looked_up_under_their_own_names(tmp_path):
    """A models directory holding both families' files: each compile picks its own family's."""
    _touch_all(tmp_path)
    for role, name in default_files(STANDARD.name).items():
        (tmp_path / name).write_bytes(b"x")
    assert default_files(STANDARD.name) == {
        "compiler": "paw-4b-qwen3-0.6b-compiler-q8_0.gguf", "mapper": "paw-4b-qwen3-0.6b-mapper.safetensors",
        "compiler_meta": "paw-4b-qwen3-0.6b-meta.json", "pseudo_compiler": "qwen3-4b-instruct-2507-q4_k_m.gguf",
        "interpreter": "qwen3-0.6b-q6_k.gguf"}
    for family in (COMPACT.name, STANDARD.name):
        files = ModelFiles().resolved(tmp_path, need_pseudo_compiler=True, family=family)
        assert {k: v.name for k, v in vars(files).items()} == default_files(family)
    (tmp_path / "paw-4b-qwen3-0.6b-mapper.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"the standard compiler \(paw-4b-qwen3-0.6b\) needs .*mapper .*"
                                                 r"`paw-lite models pull --family standard`"):
        ModelFiles().resolved(tmp_path, need_pseudo_compiler=True, family=STANDARD.name)


def test_the_compiler_meta_names_its_family(tmp_path):
    assert CompilerMeta.load(write_compiler_meta(tmp_path / "a.json")).family() is COMPACT
    for name in ("Qwen/Qwen3-0.6B", "qwen/qwen3-0.6b", "qwen3-0.6b-q6_k"):
        assert CompilerMeta.load(write_compiler_meta(tmp_path / "b.json", interpreter_model=name)).family() is STANDARD
    assert CompilerMeta.load(write_compiler_meta(tmp_path / "c.json", interpreter_model=None)).family() is None
    with pytest.raises(IncompatibleModelError, match="interpreter_model 'Qwen/Qwen3-1.7B' is neither GPT-2"):
        CompilerMeta.load(write_compiler_meta(tmp_path / "d.json", interpreter_model="Qwen/Qwen3-1.7B")).family()


def _touch_all(d: Path, **names: str) -> None:
    for role, default in DEFAULT_FILES.items():
        (d / names.get(role, default)).write_bytes(b"x")


def test_models_directory_lookup(tmp_path):
    _touch_all(tmp_path)
    files = ModelFiles().resolved(tmp_path, need_pseudo_compiler=True)
    assert {k: v.name for k, v in vars(files).items()} == DEFAULT_FILES
    # A file named explicitly wins; without a pseudo-program the pseudo compiler is not looked up.
    other = tmp_path / "elsewhere.gguf"
    other.write_bytes(b"x")
    files = ModelFiles(compiler=other).resolved(tmp_path, need_pseudo_compiler=False)
    assert files.compiler == other and files.pseudo_compiler is None


def test_another_quantization_is_used_when_the_default_is_absent(tmp_path):
    _touch_all(tmp_path, compiler="paw-4b-gpt2-compiler-q6_k.gguf")
    assert ModelFiles().resolved(tmp_path, need_pseudo_compiler=True).compiler.name == "paw-4b-gpt2-compiler-q6_k.gguf"
    (tmp_path / "paw-4b-gpt2-compiler-f16.gguf").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="several compiler files .*name one with --compiler"):
        ModelFiles().resolved(tmp_path, need_pseudo_compiler=True)


def test_all_missing_files_are_named_at_once(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        ModelFiles().resolved(tmp_path, need_pseudo_compiler=True)
    message = str(info.value)
    for name in DEFAULT_FILES.values():
        assert name in message
    assert "paw-lite models pull" in message and "--models DIR" in message


def test_compiler_meta(tmp_path):
    meta = CompilerMeta.load(write_compiler_meta(tmp_path / "m.json", rank=64, alpha=16, n_bases=64))
    assert (meta.lora_rank, meta.lora_alpha, meta.lora_num_bases, meta.prefix_steps, meta.snapshot) == (64, 16.0, 64, 64, "tiny-test")
    with pytest.raises(IncompatibleModelError, match="compiler_prompt_style is 'examples'"):
        CompilerMeta.load(write_compiler_meta(tmp_path / "m.json", compiler_prompt_style="examples"))
    good = json.loads(write_compiler_meta(tmp_path / "m.json").read_text())
    for key, value in (("lora_rank", 0), ("lora_num_bases", 2.5), ("prefix_steps", True), ("lora_alpha", "16")):
        (tmp_path / "m.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(InvalidFileError, match=f"{key} is {value!r}, expected a positive"):
            CompilerMeta.load(tmp_path / "m.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InvalidFileError, match="expected a JSON object"):
        CompilerMeta.load(tmp_path / "bad.json")
    with pytest.raises(ModelNotFoundError):
        CompilerMeta.load(tmp_path / "absent.json")
