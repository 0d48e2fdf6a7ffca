"""paw_lite's programs in the official tools: the `programasweights` 0.4.14 SDK's own code, with
llama.cpp underneath, on local files only.

- Its importer (`local_program.import_local_program`, what `programasweights.function("x.paw")`
  runs) accepts a bundle paw_lite compiled and one paw_lite wrote, unchanged, and refuses the same
  broken bundles paw_lite refuses (so the acceptance is not vacuous).
- Its runtime (`runtime_llamacpp.PawFunction`, through `programasweights.function`) runs the program
  on a tiny random interpreter GGUF to the same greedy output as paw_lite, from the same prompt ids.
- The interpreter's pinned size and sha256 and two of the three prompt texts are the SDK's own.

No network: the SDK's cache is a temporary folder (`PAW_CACHE_DIR`), its API URL a closed local port
(`PAW_API_URL`) and every call is `offline=True`. The SDK pins runtime 'gpt2-q8_0' to the published
interpreter (its sha256 in `cache.LEGACY_RUNTIME_MANIFESTS`), which cannot be downloaded here, so the
run uses the SDK's own mechanism for other runtimes instead of patching it: the program's meta.json
names a test runtime id, whose manifest (pointing at the tiny GGUF, with its size and sha256) is
stored with the SDK's `cache.save_runtime_manifest`, as its client stores a manifest it fetched.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest

import paw_lite
from paw_lite.compiler import compile as compile_program
from paw_lite.errors import ModelNotFoundError, PawError
from paw_lite.lora import LoraAdapter, write_peft_dir
from paw_lite.program import Program

from compiler_fixtures import TINY_BASES, TINY_RANK, random_mapper_state, save_mapper, tiny_qwen, write_compiler_meta
from conftest import make_hf_gpt2
from llama_oracle import official_agrees
from oracles import oracle

oracle("llama_cpp", "transformers", "peft")
programasweights = oracle("programasweights")
from programasweights import cache as sdk_cache  # noqa: E402  (after the oracle check above)
from programasweights.local_program import import_local_program  # noqa: E402

pytestmark = pytest.mark.llama

SPEC = "Classify a log line as ALERT when it reports a failure, else QUIET."
PSEUDO = ("[PSEUDO_PROGRAM]\nTask: Answer ALERT for failures, QUIET otherwise.\n\nExamples:\n"
          "Input: disk full on /var\nOutput: ALERT\n\nInput: user logged in\nOutput: QUIET\n[END_PSEUDO_PROGRAM]")
INPUTS = ["disk usage at 99% on /var", "user alice logged in", "  ünïcödé ✓", "\n\nleading newlines", ""]
N_CTX = 512
MAX_TOKENS = 16
TEST_RUNTIME = "paw-lite-test-gpt2"


@pytest.fixture(autouse=True)
def sdk_offline(tmp_path, monkeypatch) -> Path:
    """The SDK's configuration, all local: its cache in the test's folder, no reachable server."""
    home = tmp_path / "sdk"
    monkeypatch.setenv("PAW_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("PAW_API_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("PAW_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(home))  # its config file (~/.config/programasweights) too
    monkeypatch.setenv("PAW_LITE_CACHE", str(tmp_path / "paw-lite-cache"))
    return home / "cache"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, vocab_dir, hf_tokenizer_dir) -> dict:
    """A program compiled by paw_lite (tiny random compiler, mapper and interpreter; Q4_0 adapter as
    official programs), with its interpreter (HF folder and F32 GGUF)."""
    from paw_lite.base_model import read_header
    from paw_lite.compiler.config import DEFAULT_FILES
    from paw_lite.convert.gpt2 import convert_hf_gpt2

    root = tmp_path_factory.mktemp("official")
    hf = make_hf_gpt2(root / "hf", hf_tokenizer_dir, n_ctx=N_CTX)
    gguf = convert_hf_gpt2(hf, root / "tiny-gpt2-f32.gguf", "f32")
    models = root / "models"
    models.mkdir()
    config, _ = read_header(gguf)
    save_mapper(models / DEFAULT_FILES["mapper"], random_mapper_state(256, config, TINY_RANK, TINY_BASES, seed=3))
    write_compiler_meta(models / DEFAULT_FILES["compiler_meta"])
    compiler = tiny_qwen(tmp_path_factory, vocab_dir)[1]
    for key, src in (("compiler", compiler), ("pseudo_compiler", compiler), ("interpreter", gguf)):
        (models / DEFAULT_FILES[key]).symlink_to(src)
    bundle = compile_program(SPEC, root / "compiled.paw", pseudo_program=PSEUDO, models=models)
    return {"bundle": bundle, "gguf": gguf, "hf": hf}


@pytest.fixture(scope="module")
def written(tiny_program, tiny_gguf, tiny_hf) -> dict:
    """A program paw_lite wrote with Program.save (conftest: F32 adapter, rank 32) on the 128-position interpreter."""
    return {"bundle": tiny_program, "gguf": tiny_gguf, "hf": tiny_hf}


@pytest.fixture(params=["compiled", "written"])
def case(request) -> dict:
    return request.getfixturevalue(request.param)


def test_the_official_importer_accepts_paw_lites_bundles_unchanged(case, sdk_offline):
    program = Program.load(case["bundle"])
    imported = import_local_program(case["bundle"])
    assert imported.parent == sdk_offline / "local_programs"  # the SDK's cache, as configured
    assert {p.name: p.read_bytes() for p in imported.iterdir()} == program.members()
    assert sdk_cache.validate_program_assets_dir(imported, program.meta["program_id"])
    # its runtime's own checks, before any model is loaded: adapter file, template placeholder
    assert sdk_cache.is_valid_adapter_file(imported / "adapter.gguf")
    assert sdk_cache.get_offline_runtime_manifest(program.meta)["runtime_id"] == program.meta["runtime_id"] == "gpt2-q8_0"


def zip_of(members: dict[str, bytes] | list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in (members.items() if isinstance(members, dict) else members):
            zf.writestr(name, data)
    return buf.getvalue()


def _meta(members: dict[str, bytes], **changes) -> dict[str, bytes]:
    return {**members, "meta.json": json.dumps({**json.loads(members["meta.json"]), **changes}).encode()}


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16  # a symbolic link, as zip tools store one
    return info


# Broken bundles, one per rule of the official importer (local_program.py, client._safe_extract_paw,
# cache.validate_program_assets_dir), as archive bytes built from a good bundle's members.
BROKEN = {
    "an extra member": lambda m: zip_of({**m, "prefix_cache.bin": b"x"}),
    "no adapter": lambda m: zip_of({k: v for k, v in m.items() if k != "adapter.gguf"}),
    "no template": lambda m: zip_of({k: v for k, v in m.items() if k != "prompt_template.txt"}),
    "no meta.json": lambda m: zip_of({k: v for k, v in m.items() if k != "meta.json"}),
    "a template without the placeholder": lambda m: zip_of({**m, "prompt_template.txt": b"no placeholder"}),
    "two placeholders": lambda m: zip_of({**m, "prompt_template.txt": b"{INPUT_PLACEHOLDER} {INPUT_PLACEHOLDER}"}),
    "an adapter that is not GGUF": lambda m: zip_of({**m, "adapter.gguf": b"NOPE" + m["adapter.gguf"][4:]}),
    "an adapter under 1024 bytes": lambda m: zip_of({**m, "adapter.gguf": m["adapter.gguf"][:1000]}),
    "meta.json not JSON": lambda m: zip_of({**m, "meta.json": b"{not json"}),
    "no interpreter": lambda m: zip_of(_meta(m, interpreter="")),
    "a member outside the folder": lambda m: zip_of([*m.items(), ("../meta.json", m["meta.json"])]),
    "an absolute member": lambda m: zip_of([*m.items(), ("/tmp/meta.json", m["meta.json"])]),
    "a duplicate member": lambda m: zip_of([*m.items(), ("meta.json", m["meta.json"])]),
    "a link member": lambda m: zip_of([*((k, v) for k, v in m.items() if k != "meta.json"),
                                       (_symlink("meta.json"), b"/etc/passwd")]),
    "257 members": lambda m: zip_of([*m.items(), *((f"x{i}", b"") for i in range(257 - len(m)))]),
    "not a zip": lambda m: b"PK\x03\x04 this is not an archive",
}


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile's, for the duplicate member built on purpose
@pytest.mark.parametrize("broken", list(BROKEN))
def test_what_the_official_importer_refuses_paw_lite_refuses(written, tmp_path, broken):
    """The importer is a real oracle here: each of its rules refuses a bundle, and so does paw_lite."""
    path = tmp_path / "broken.paw"
    path.write_bytes(BROKEN[broken](Program.load(written["bundle"]).members()))
    with pytest.raises((ValueError, RuntimeError)):  # RuntimeError: its word for "not a ZIP archive"
        import_local_program(path)
    with pytest.raises(PawError):
        Program.load(path)


def test_two_rules_paw_lite_applies_later(written, tmp_path, monkeypatch):
    """Two rules of the official importer that paw_lite does not apply on reading, on purpose: a
    program id that is not 16 to 64 lowercase hex digits loads (test_program.py; Program.save never
    writes one), and a runtime id that is not a plain name is refused only where it would pick the
    interpreter file (test_security_bundle.py), not when an interpreter is given."""
    members = Program.load(written["bundle"]).members()
    odd_id, odd_runtime = tmp_path / "odd-id.paw", tmp_path / "odd-runtime.paw"
    odd_id.write_bytes(zip_of(_meta(members, program_id="not-ours")))
    odd_runtime.write_bytes(zip_of(_meta(members, runtime_id="../gpt2-q8_0")))
    for path in (odd_id, odd_runtime):
        with pytest.raises(ValueError):
            import_local_program(path)
    assert Program.load(odd_id).program_id == "not-ours"
    assert Program.load(odd_runtime).meta["runtime_id"] == "../gpt2-q8_0"
    monkeypatch.setenv("PAW_LITE_MODELS", str(tmp_path / "models"))
    with pytest.raises(ModelNotFoundError, match="not a valid model file name"):
        paw_lite.function(odd_runtime)


def official_runtime_bundle(program: Program, interpreter: Path, sdk_cache_dir: Path, folder: Path) -> Path:
    """The same program under a test runtime id whose manifest, in the SDK's cache, names the tiny interpreter."""
    data = interpreter.read_bytes()
    manifest = json.loads(json.dumps(sdk_cache.LEGACY_RUNTIME_MANIFESTS["gpt2-q8_0"]))
    manifest.update(runtime_id=TEST_RUNTIME, display_name="tiny random GPT-2 (paw_lite tests)")
    manifest["local_sdk"]["base_model"] = {"provider": "local", "file": interpreter.name, "url": interpreter.as_uri(),
                                           "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["local_sdk"]["n_ctx"] = N_CTX
    manifest["js_sdk"] = {"supported": False, "base_model": None, "prefix_cache_supported": False}
    sdk_cache.save_runtime_manifest(manifest)
    (sdk_cache_dir / "base_models").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(interpreter, sdk_cache_dir / "base_models" / interpreter.name)
    meta = {**program.meta, "runtime_id": TEST_RUNTIME}
    return Program(meta=meta, template=program.template, adapter_gguf=program.adapter_gguf,
                   pseudo_program=program.pseudo_program).save(folder / "for-the-official-runtime.paw")


def test_the_official_runtime_runs_it_to_paw_lites_output(case, sdk_offline, tmp_path):
    program = Program.load(case["bundle"])
    bundle = official_runtime_bundle(program, case["gguf"], sdk_offline, tmp_path)
    PeftModel, GPT2LMHeadModel = oracle("peft").PeftModel, oracle("transformers").GPT2LMHeadModel
    with paw_lite.function(case["bundle"], base_model=case["gguf"]) as ours:
        write_peft_dir(tmp_path / "peft", LoraAdapter.from_program(program, ours.config))
        hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(case["hf"]), tmp_path / "peft").eval()
        theirs = programasweights.function(str(bundle), n_ctx=ours.config.n_ctx, offline=True)
        try:
            exact, outputs = official_agrees(theirs, ours, hf, INPUTS, MAX_TOKENS)
            assert len(outputs) > 1, "outputs should depend on the input"
            # measured here: all 5 inputs equal for the F32 adapter, 4 of 5 for the Q4_0 one (a near-tie
            # at the 6th token); at least one equal to the last token keeps the test from resting on ties
            assert exact >= 1
        finally:
            theirs.close()


# -- facts paw_lite takes from the official SDK ---------------------------------------------------------


@pytest.mark.parametrize("family,runtime_id", [("compact", "gpt2-q8_0"), ("standard", "qwen3-0.6b-q6_k")])
def test_the_pinned_interpreter_is_the_one_the_official_sdk_pins(family, runtime_id):
    """models/manifest.json pins gpt2-q8_0.gguf and qwen3-0.6b-q6_k.gguf by size and sha256 as
    published: the same values the official SDK checks a downloaded interpreter against
    (cache.LEGACY_RUNTIME_MANIFESTS), and the runtime id and interpreter paw_lite's families name."""
    from paw_lite.families import family_named
    from paw_lite.models_dir import manifest

    runtime = sdk_cache.LEGACY_RUNTIME_MANIFESTS[runtime_id]
    official = runtime["local_sdk"]["base_model"]
    ours = manifest.manifest_entry(family, "interpreter")
    assert (ours.name, ours.bytes, ours.sha256) == (official["file"], official["size_bytes"], official["sha256"])
    assert ours.source["repo"] == official["repo"]
    assert (family_named(family).runtime_id, family_named(family).interpreter) == (runtime_id, runtime["interpreter"])


def test_the_bundle_limits_are_the_official_importers():
    from paw_lite import program
    from programasweights import client

    assert (program.MAX_ARCHIVE_BYTES, program.MAX_MEMBER_COUNT, program.MAX_EXPANDED_BYTES, program.MIN_ADAPTER_BYTES) == (
        client.MAX_PAW_ARCHIVE_BYTES, client.MAX_PAW_ARCHIVE_MEMBERS, client.MAX_PAW_EXPANDED_BYTES,
        sdk_cache.MIN_ADAPTER_GGUF_SIZE)
    assert set(program.MEMBERS) == set(programasweights.local_program._ALLOWED_FILES)
    assert set(program.REQUIRED_MEMBERS) == set(programasweights.local_program._REQUIRED_FILES)
    assert program.PLACEHOLDER == sdk_cache.INPUT_PLACEHOLDER


def sdk_prompt_functions() -> dict:
    """`compiler_prompt` and `interpreter_prompt` of the SDK's compiler module, read from its source:
    the module itself cannot be imported (it imports a `utils` module the wheel does not ship)."""
    import ast

    path = Path(programasweights.__file__).parent / "compiler" / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef)
              and node.name in ("compiler_prompt", "interpreter_prompt")]
    namespace: dict = {}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)  # two f-string functions
    return namespace


@pytest.mark.parametrize("spec", ["Classify a log line as ALERT or QUIET.", "Traduire « bonjour » → 你好 {spec} 🙂"])
def test_prompt_texts_equal_the_official_sdks(spec):
    """compiler_minimal.txt and interpreter_minimal.txt, filled, give the SDK's own prompts.
    (compiler_examples.txt is not in the SDK: its bytes are pinned by test_compiler_prompts only.)"""
    from paw_lite.compiler.prompts import interpreter_template, minimal_prompt
    from paw_lite.program import PLACEHOLDER

    sdk = sdk_prompt_functions()
    assert minimal_prompt(spec) == sdk["compiler_prompt"](spec)
    pseudo = "\n[PSEUDO_PROGRAM]\nTask: " + spec + "\n[END_PSEUDO_PROGRAM]\n\n"
    for text in ("disk full on /var", "naïve café"):
        assert interpreter_template(pseudo).replace(PLACEHOLDER, text) == sdk["interpreter_prompt"](pseudo, text)
