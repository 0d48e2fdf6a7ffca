"""The PAW REST API of `paw-lite serve`, through the unmodified official `programasweights` 0.4.14
client pointed at the real server (`PAW_API_URL`), on tiny compiler models:

- `compile()` compiles a spec with paw_lite's CPU compiler; the same spec again gives the same
  program without a second compile, also after a restart (the index in data_dir);
- `function(program_id)` downloads the program (the client's own archive checks and importer
  rules), fetches its runtime manifest and the interpreter GGUF from the server (checked by size
  and sha256), and runs it through the SDK's llama.cpp runtime to paw_lite's own output;
- compile jobs run in the background, one at a time, with progress in their status, while
  inference and downloads go on; queued jobs cancel, running ones answer 409; a stopped server's
  queued and running jobs are queued again by the next one, under their ids;
- errors: an unknown compiler (422 naming the one there is), no compiler (503), traversal and
  unknown ids (404 "not found": the client gives up at once), a wrong or missing API key (401);
- both families on one server: with the Compact and the Standard compiler files in its models
  folder it lists both compilers, `compile(spec, compiler="paw-4b-qwen3-0.6b")` makes a Standard
  program that the client downloads, imports and runs on the Qwen3 interpreter the server serves
  (its llama.cpp tokens equal paw_lite's, up to a near-tie), and `qwen3-0.6b-q6_k` is the client's
  own pinned manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
from pathlib import Path

import pytest

import paw_lite
from paw_lite.base_model import read_header
from paw_lite.compiler import CompileOptions, ModelFiles
from paw_lite.compiler.config import DEFAULT_FILES
from paw_lite.lora import LoraAdapter, write_peft_dir
from paw_lite.program import Program

from compiler_fixtures import TINY_BASES, TINY_RANK, random_mapper_state, save_mapper, tiny_qwen, write_compiler_meta
from conftest import make_hf_gpt2
from standard_fixtures import N_CTX as STD_N_CTX
from standard_fixtures import standard_models_dir, tiny_standard_interpreter
from llama_oracle import official_agrees
from oracles import oracle

oracle("llama_cpp", "transformers", "peft", "starlette", "uvicorn")
httpx = oracle("httpx")
openai = oracle("openai")
programasweights = oracle("programasweights")
from programasweights import cache as sdk_cache  # noqa: E402  (after the oracle check above)
from programasweights.client import PAWClient  # noqa: E402

from paw_lite.serve import paw_api  # noqa: E402
from paw_lite.serve.app import build_app  # noqa: E402
from paw_lite.serve.compile_jobs import MAX_PENDING_RECORD_BYTES, CompileJobs  # noqa: E402
from paw_lite.serve.run import serving  # noqa: E402
from paw_lite.serve.settings import ServeSettings  # noqa: E402

pytestmark = pytest.mark.llama

SPEC = "Classify a log line as ALERT when it reports a failure, else QUIET."
OTHER_SPEC = "Answer YES when the sentence mentions a colour, else NO."
THIRD_SPEC = "Reverse the order of the words."
INPUTS = ["disk usage at 99% on /var", "user alice logged in", "  ünïcödé ✓"]
N_CTX = 512  # the interpreter's positions: room for a pseudo-program under the 256-token input reserve
MAX_TOKENS = 16
# Small enough to keep a compile on the tiny models to seconds; F32 adapters, so the SDK's llama.cpp
# and paw_lite meet on the same numbers (a Q4_0 adapter gives near-ties, test_official_tools.py).
OPTIONS = CompileOptions(max_new_tokens=24, adapter_type="f32")
# A generous bound for waits on another thread's progress (a compile of the tiny models takes seconds):
# only a hang reaches it.
WAIT_S = 300


@pytest.fixture(scope="module")
def models(tmp_path_factory, vocab_dir, hf_tokenizer_dir) -> dict:
    """Tiny random compiler, pseudo compiler, mapper and meta in a models folder as `paw-lite models
    pull` lays it out, and a tiny interpreter named tiny-gpt2-f32.gguf: programs compiled for it
    name runtime 'tiny-gpt2-f32', whose manifest and GGUF the server itself provides."""
    from paw_lite.convert.gpt2 import convert_hf_gpt2

    root = tmp_path_factory.mktemp("pawapi-models")
    hf = make_hf_gpt2(root / "hf", hf_tokenizer_dir, n_ctx=N_CTX)
    gguf = convert_hf_gpt2(hf, root / "tiny-gpt2-f32.gguf", "f32")
    folder = root / "models"
    folder.mkdir()
    config, _ = read_header(gguf)
    save_mapper(folder / DEFAULT_FILES["mapper"], random_mapper_state(256, config, TINY_RANK, TINY_BASES, seed=3))
    write_compiler_meta(folder / DEFAULT_FILES["compiler_meta"])
    qwen = tiny_qwen(tmp_path_factory, vocab_dir)[1]
    for key in ("compiler", "pseudo_compiler"):
        (folder / DEFAULT_FILES[key]).symlink_to(qwen)
    return {"dir": folder, "gguf": gguf, "hf": hf}


def make_settings(root: Path, models: dict, **changes) -> ServeSettings:
    (root / "programs").mkdir(parents=True, exist_ok=True)
    fields = {"programs_dir": root / "programs", "data_dir": root / "data", "port": 0, "interpreter": models["gguf"],
              "compile_models": ModelFiles(interpreter=models["gguf"]), "models_dir": models["dir"],
              "cache_dir": root / "cache"}
    return ServeSettings(**{**fields, **changes})


def make_jobs(settings: ServeSettings, **kwargs) -> CompileJobs:
    options = dataclasses.replace(OPTIONS, cache_dir=settings.data_dir / "compiler-cache")
    return CompileJobs(settings.data_dir, settings.compile_models, settings.models_dir, options, **kwargs)


@contextlib.contextmanager
def server(settings: ServeSettings, jobs: CompileJobs):
    """The real server (both faces) on a free loopback port, stopped on the way out."""
    app = build_app(settings, extra_routes=paw_api.routes(settings, jobs))
    with serving(settings, app) as url:
        yield url


@contextlib.contextmanager
def official_client(root: Path, url: str, api_key: str | None = None):
    """The official client's configuration, pointed at the server: its cache and config file in
    `root`, nothing from the user's environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAW_API_URL", url)
        mp.setenv("PAW_CACHE_DIR", str(root / "sdk-cache"))
        mp.setenv("HOME", str(root / "home"))  # its ~/.config/programasweights
        mp.setenv("PAW_QUIET", "1")
        for name in ("PAW_API_KEY", "PAW_OFFLINE", "PAW_GPU_LAYERS"):
            mp.delenv(name, raising=False)
        if api_key is not None:
            mp.setenv("PAW_API_KEY", api_key)
        yield root / "sdk-cache"


@pytest.fixture(scope="module")
def served(models, tmp_path_factory) -> dict:
    """One server for the module, and the first compile of SPEC through the official client."""
    root = tmp_path_factory.mktemp("pawapi-served")
    settings = make_settings(root, models)
    jobs = make_jobs(settings)
    with server(settings, jobs) as url, official_client(root, url):
        program = programasweights.compile(SPEC)
        yield {"url": url, "root": root, "settings": settings, "jobs": jobs, "program": program,
               "compiles_after_first": jobs.compiles}


@pytest.fixture
def sdk(served, tmp_path):
    """The official client configured for the module's server, with a fresh cache for this test."""
    with official_client(tmp_path, served["url"]) as cache:
        yield cache


def test_the_official_client_compiles_a_spec_on_the_server(served, sdk):
    program, jobs = served["program"], served["jobs"]
    assert served["compiles_after_first"] == 1
    assert sdk_cache.is_program_id(program.id) and program.status == "compiled"
    assert (program.compiler_snapshot, program.compiler_kind, program.runtime_id) == ("tiny-test", "finetune", "tiny-gpt2-f32")
    assert program.pseudo_program_strategy == "examples" and program.timings["total_s"] > 0
    stored = Program.load(served["settings"].compiled_dir / f"{program.id}.paw")
    assert stored.program_id == program.id and stored.spec == SPEC
    # the same spec again: the same program, no second compile; the precheck knows it
    again = programasweights.compile(SPEC)
    assert again.id == program.id and jobs.compiles == 1
    assert programasweights.precheck_compile(SPEC) == {
        "cached": True, "program_id": program.id, "compiler_snapshot": "tiny-test", "compiler_kind": "finetune",
        "queue_length": 0, "estimated_wait_s": None}
    assert programasweights.precheck_compile(OTHER_SPEC)["cached"] is False
    # what the client lists: the compiler, the program
    [compiler] = programasweights.list_compilers()
    assert compiler["name"] == "tiny-test" and compiler["runtime_id"] == "tiny-gpt2-f32" and compiler["default"]
    listed = programasweights.list_programs()
    assert program.id in [p["id"] for p in listed["programs"]] and listed["total"] >= 1
    meta = PAWClient().get_program_meta(program.id)
    assert (meta["id"], meta["spec"], meta["interpreter"], meta["compiler_snapshot"]) == (program.id, SPEC, "gpt2", "tiny-test")


def test_the_official_client_downloads_and_runs_the_program_to_paw_lites_output(served, sdk, models, tmp_path):
    """`function(id)`: the client's download (archive rules, its importer's checks), runtime manifest
    and interpreter download from the server, then its llama.cpp runtime; the greedy tokens equal
    paw_lite's (or differ only at a near-tie, judged by transformers + PEFT)."""
    program_id = served["program"].id
    theirs = programasweights.function(program_id, n_ctx=N_CTX)
    try:
        assert sdk_cache.has_valid_program_assets(program_id)  # installed in its cache, valid by its rules
        downloaded = sdk / "programs" / program_id
        ours_program = Program.load(served["settings"].compiled_dir / f"{program_id}.paw")
        assert (downloaded / "adapter.gguf").read_bytes() == ours_program.adapter_gguf
        base = sdk / "base_models" / "tiny-gpt2-f32.gguf"
        assert base.read_bytes() == models["gguf"].read_bytes()  # from the server, checked by its sha256
        PeftModel, GPT2LMHeadModel = oracle("peft").PeftModel, oracle("transformers").GPT2LMHeadModel
        with paw_lite.function(ours_program, base_model=models["gguf"]) as ours:
            write_peft_dir(tmp_path / "peft", LoraAdapter.from_program(ours_program, ours.config))
            hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(models["hf"]), tmp_path / "peft").eval()
            exact, _ = official_agrees(theirs, ours, hf, INPUTS, MAX_TOKENS)
            assert exact >= 1  # not resting on ties alone
    finally:
        theirs.close()


def test_hosted_inference_runs_the_program_on_the_server(served, sdk, models):
    """`function(id, remote=True)`: the client posts the input to /api/v1/infer; the answer is the
    program's in-process output."""
    program_id = served["program"].id
    with paw_lite.function(served["settings"].compiled_dir / f"{program_id}.paw", base_model=models["gguf"]) as fn:
        expected = [fn(text, max_tokens=MAX_TOKENS) for text in INPUTS]
    with programasweights.function(program_id, remote=True) as remote:
        assert [remote(text, max_tokens=MAX_TOKENS) for text in INPUTS] == expected
    with programasweights.function("0123456789abcdef0123", remote=True) as missing:
        with pytest.raises(programasweights.APIError) as info:
            missing("x")
    assert info.value.response.status_code == 404 and "not found" in info.value.message
    url = served["url"]
    for body in ({"program_id": program_id}, {"program_id": program_id, "input": 3},
                 {"program_id": program_id, "input": "x", "max_tokens": "8"}):
        assert httpx.post(f"{url}/api/v1/infer", json=body).status_code == 422, body
    assert httpx.post(f"{url}/api/v1/infer", json={"program_id": program_id, "input": "x", "max_tokens": 10**6}).status_code == 400


def test_a_restarted_server_finds_what_it_compiled(served, models, tmp_path):
    """Programs and the index live in data_dir: a new server (new queue) answers the same spec from
    there, without compiling."""
    settings = served["settings"]
    jobs = make_jobs(settings)
    with server(settings, jobs) as url, official_client(tmp_path, url):
        assert programasweights.compile(SPEC).id == served["program"].id
        assert jobs.compiles == 0


def test_slugs_name_programs_with_versions(served, sdk):
    program_id = served["program"].id
    first = programasweights.compile(SPEC, slug="log-triage")
    assert (first.id, first.slug, first.version, first.version_action) == (program_id, "log-triage", 1, "created")
    again = programasweights.compile(SPEC, slug="log-triage")
    assert (again.version, again.version_action) == (1, "no_change")
    assert served["jobs"].compiles == 1  # both answered from the index
    client = PAWClient()
    assert client.resolve_slug("log-triage") == client.resolve_slug("log-triage@v1") == program_id
    assert programasweights.list_versions("log-triage") == {
        "slug": "log-triage", "main_version": 1, "versions": [{"version": 1, "program_id": program_id, "is_main": True}]}
    with pytest.raises(httpx.HTTPStatusError) as info:
        client.resolve_slug("no-such-slug")
    assert info.value.response.status_code == 404
    with pytest.raises(programasweights.APIError) as bad:
        programasweights.compile(SPEC, slug="../../etc")
    assert bad.value.response.status_code == 422


def test_the_published_runtime_is_the_clients_own_manifest(served, sdk):
    """gpt2-q8_0: the client pins its own manifest; the served one equals it and passes its checks."""
    served_manifest = httpx.get(f"{served['url']}/api/v1/models/runtimes/gpt2-q8_0").json()
    assert served_manifest == sdk_cache.LEGACY_RUNTIME_MANIFESTS["gpt2-q8_0"]
    assert sdk_cache.fetch_runtime_manifest("gpt2-q8_0", api_url=served["url"]) == served_manifest


def test_errors_the_client_acts_on(served, sdk, tmp_path):
    url = served["url"]
    # an unknown compiler: 422, naming the one there is
    with pytest.raises(programasweights.APIError) as unknown:
        programasweights.compile(SPEC, compiler="paw-4b-qwen3-0.6b")
    assert unknown.value.response.status_code == 422 and "'tiny-test'" in unknown.value.message
    # an unknown program id: 404 whose detail says "not found", so the client stops at once
    with pytest.raises(RuntimeError, match="not found on server"):
        PAWClient().download_paw("0123456789abcdef0123")
    # ids that are not ids, including traversal attempts: 404, nothing outside the data folders
    secret = served["settings"].data_dir.parent / "secret.paw"
    shutil.copyfile(served["settings"].compiled_dir / f"{served['program'].id}.paw", secret)
    for path in ["programs/..%2Fsecret/download", "programs/..%2F..%2Fsecret/download", "programs/%2e%2e/download",
                 "programs/secret", "programs/..%2Fcompiled%2F" + served["program"].id,
                 "models/runtimes/..%2Ftiny-gpt2-f32", "models/runtimes/..%2F..%2Fhf/gguf",
                 "models/runtimes/tiny-gpt2-f32%2F..%2F..%2Fsecret/gguf", "compile/..%2F..%2Fsecret",
                 "compile/0123456789abcdef0123456789abcdef", "programs/resolve/..%2Fsecret",
                 # a GGUF in the models folder that is no GPT-2 interpreter (the compiler) is no runtime
                 "models/runtimes/" + Path(DEFAULT_FILES["compiler"]).stem,
                 "models/runtimes/" + Path(DEFAULT_FILES["compiler"]).stem + "/gguf"]:
        response = httpx.get(f"{url}/api/v1/{path}")
        assert response.status_code == 404, path
        assert "not found" in response.json()["detail"].lower() or "no route" in response.json()["detail"], path
    response = httpx.delete(f"{url}/api/v1/compile/0123456789abcdef0123456789abcdef")
    assert response.status_code == 404
    # malformed requests: the body, the spec
    assert httpx.post(f"{url}/api/v1/compile", content=b"{not json").status_code == 400
    for body in ([SPEC], {"spec": ""}, {"spec": 5}, {"spec": SPEC, "compiler": 3}, {"spec": SPEC, "public": "yes"}):
        assert httpx.post(f"{url}/api/v1/compile", json=body).status_code == 422, body
    # and the server still serves
    assert httpx.get(f"{url}/api/v1/models/compilers").status_code == 200


def test_compile_jobs_run_in_the_background_with_progress_while_inference_goes_on(served, models, tmp_path):
    """A compile held inside its encoder pass (its progress hook waits for the test): its status
    shows the stage and counts; a /v1 completion and a program download finish meanwhile; a second
    job waits in the queue and cancels; the running one refuses to (409); released, it finishes."""
    reached, release = threading.Event(), threading.Event()
    updates: list[dict] = []

    def hold_in_encoder(status: dict) -> None:
        updates.append(status)
        if status["stage"] == "encoder" and status["progress"] and not reached.is_set():
            reached.set()
            release.wait(WAIT_S)

    settings = make_settings(tmp_path, models)
    shutil.copyfile(served["settings"].compiled_dir / f"{served['program'].id}.paw", settings.programs_dir / "alert.paw")
    jobs = make_jobs(settings, on_update=hold_in_encoder)
    with server(settings, jobs) as url, official_client(tmp_path, url):
        try:
            job = programasweights.compile_async(OTHER_SPEC, compiler="tiny-test")
            assert job["status"] in ("queued", "running") and not job["cached"]
            assert reached.wait(WAIT_S), "the compile never reached its encoder pass"
            status = programasweights.get_compile_status(job["job_id"])
            assert status["status"] == "running" and status["stage"] == "encoder"
            assert status["progress"]["unit"] == "token-layers" and 0 < status["progress"]["done"] <= status["progress"]["total"]
            assert 45 < status["percent"] < 100
            assert updates[0]["stage"] == "check"
            assert any(u["stage"] == "pseudo-program" and u["progress"] for u in updates)
            # inference and downloads while the compile is held
            with paw_lite.function(served["settings"].compiled_dir / f"{served['program'].id}.paw",
                                   base_model=models["gguf"]) as fn:
                expected = fn(INPUTS[0], max_tokens=8)
            completion = openai.OpenAI(base_url=url + "/v1", api_key="none").completions.create(
                model="alert", prompt=INPUTS[0], max_tokens=8)
            assert completion.choices[0].text == expected
            assert PAWClient().download_paw(served["program"].id).is_dir()
            assert PAWClient().resolve_slug("alert") == served["program"].id  # a served program's name is a slug
            # a second job queues behind it, and cancels; the running one cannot
            second = programasweights.compile_async(THIRD_SPEC, compiler="tiny-test")
            assert second["status"] == "queued" and second["queue_position"] == 1
            assert programasweights.cancel_compile(second["job_id"]) == {"job_id": second["job_id"], "status": "cancelled"}
            with pytest.raises(programasweights.APIError) as started:
                programasweights.cancel_compile(job["job_id"])
            assert started.value.response.status_code == 409
        finally:
            release.set()
        # the synchronous endpoint joins the running job for the same spec instead of compiling it again
        program = programasweights.compile(OTHER_SPEC)
        done = programasweights.get_compile_status(job["job_id"])
        assert (done["status"], done["program_id"], done["percent"]) == ("done", program.id, 100.0)
        assert [p["name"] for p in done["timings"]["phases"]] == ["check", "pseudo-program", "encoder", "mapper", "bundle"]
        assert jobs.compiles == 1  # the cancelled job never ran
        assert programasweights.get_compile_status(second["job_id"])["status"] == "cancelled"
        # the new program is a model of the OpenAI face too, named by its id
        assert program.id in [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key="none").models.list()]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the compile thread's death, on purpose
def test_a_stopped_server_resumes_its_queued_and_running_jobs(served, models, tmp_path):
    """A server stops with one job running (held in its encoder pass) and one queued; its compile
    thread then dies as a stopped process's does. The next server on the same data folder queues
    both again under their ids: the official client's status polls see them finish, with the
    programs the specs give, and the pending records are gone."""
    reached, release = threading.Event(), threading.Event()

    def hold_then_die(status: dict) -> None:
        if status["stage"] == "encoder" and not reached.is_set():
            reached.set()
            release.wait(WAIT_S)
            raise SystemExit  # the thread ends as the process would: no record is touched

    settings = make_settings(tmp_path, models)
    first = make_jobs(settings, on_update=hold_then_die)
    with server(settings, first) as url, official_client(tmp_path, url):
        running = programasweights.compile_async(OTHER_SPEC, compiler="tiny-test")
        assert reached.wait(WAIT_S), "the compile never reached its encoder pass"
        queued = programasweights.compile_async(THIRD_SPEC, compiler="tiny-test")
        assert queued["status"] == "queued"
    ids = {running["job_id"], queued["job_id"]}
    assert {p.stem for p in (settings.data_dir / "compile_pending").glob("*.json")} == ids
    worker = first._worker
    release.set()
    worker.join(WAIT_S)
    assert not list(settings.compiled_dir.glob("*.paw"))  # nothing was compiled before the stop

    second = make_jobs(settings)
    with server(settings, second) as url, official_client(tmp_path, url):
        for job, spec in ((running, OTHER_SPEC), (queued, THIRD_SPEC)):
            status = programasweights.get_compile_status(job["job_id"])
            assert status["status"] in ("queued", "running", "done")
            program = programasweights.compile(spec)  # joins the resumed job, or finds its program
            assert programasweights.get_compile_status(job["job_id"])["program_id"] == program.id
    assert second.compiles == 2
    assert not list((settings.data_dir / "compile_pending").glob("*.json"))


def test_pending_records_that_cannot_resume(tmp_path):
    """Records a server cannot queue again: one for a compiler it lacks fails its job, saying why;
    unreadable, oversized or misnamed ones are removed. Nothing is compiled."""
    pending = tmp_path / "data" / "compile_pending"
    pending.mkdir(parents=True)
    job_id = "ab" * 16
    record = {"job_id": job_id, "spec": SPEC, "family": "compact", "compiler": "paw-4b-gpt2",
              "created_at": "2026-12-07T00:00:00Z"}
    (pending / f"{job_id}.json").write_text(json.dumps(record))
    (pending / f"{'cd' * 16}.json").write_text("{not json")
    (pending / f"{'ef' * 16}.json").write_text(json.dumps({**record, "job_id": "ab" * 16}))  # names another job
    (pending / f"{'01' * 16}.json").write_bytes(b" " * (MAX_PENDING_RECORD_BYTES + 1))
    jobs = CompileJobs(tmp_path / "data", ModelFiles(), models_dir=tmp_path / "no-models")
    assert jobs.resume() == [job_id]
    status = jobs.status(job_id)
    assert status["status"] == "failed" and "restarted without the compiler" in status["error"]
    assert status["compiler_snapshot"] is None and jobs.compiles == 0
    assert not list(pending.iterdir())


def test_a_compile_that_fails_says_why(models, tmp_path):
    """A mapper that does not fit the interpreter fails the job in its check phase: 422 with the
    compiler's message, and the job status says failed with the same error."""
    folder = tmp_path / "models"
    shutil.copytree(models["dir"], folder, symlinks=True)
    (folder / DEFAULT_FILES["mapper"]).unlink()
    config, _ = read_header(models["gguf"])
    save_mapper(folder / DEFAULT_FILES["mapper"], {"trunk.0.weight": random_mapper_state(256, config)["trunk.0.weight"]})
    settings = make_settings(tmp_path, {**models, "dir": folder})
    failed_jobs: list[str] = []
    second_failed = threading.Event()

    def on_update(status: dict) -> None:
        if status["status"] == "failed":
            failed_jobs.append(status["job_id"])
            if len(failed_jobs) == 2:
                second_failed.set()

    jobs = make_jobs(settings, on_update=on_update)
    with server(settings, jobs) as url, official_client(tmp_path, url):
        with pytest.raises(programasweights.APIError) as failed:
            programasweights.compile(SPEC)
        assert failed.value.response.status_code == 422 and failed.value.message.startswith("compile failed: ")
        assert "mapper" in failed.value.message and jobs.compiles == 1
        # the failed request is not remembered as a program: the same request is a new job, failing again
        job = programasweights.compile_async(SPEC, compiler="tiny-test")
        assert job["cached"] is False
        assert second_failed.wait(WAIT_S)
        status = programasweights.get_compile_status(job["job_id"])
        assert (status["status"], status["program_id"], jobs.compiles) == ("failed", None, 2)
        assert "compile failed: " + status["error"] == failed.value.message
        assert not list(settings.compiled_dir.glob("*.paw"))  # nothing half-written was left


def test_without_compiler_files_compiles_answer_503_and_the_list_is_empty(models, tmp_path):
    settings = make_settings(tmp_path, {**models, "dir": tmp_path / "empty"}, compile_models=ModelFiles())
    with server(settings, make_jobs(settings)) as url, official_client(tmp_path, url):
        assert programasweights.list_compilers() == []
        reply = httpx.get(f"{url}/api/v1/models/compilers").json()
        assert "the compact compiler (paw-4b-gpt2) needs files that are not there" in reply["unavailable"]["paw-4b-gpt2"]
        assert "paw-lite models pull --family standard" in reply["unavailable"]["paw-4b-qwen3-0.6b"]
        with pytest.raises(programasweights.APIError) as none:
            programasweights.compile(SPEC)
        assert none.value.response.status_code == 503 and "paw-lite models pull" in none.value.message


def test_an_api_key_is_required_when_set(served, models, tmp_path):
    settings = make_settings(tmp_path, models, api_key="s3cret")
    with server(settings, make_jobs(settings)) as url:
        with official_client(tmp_path, url):
            with pytest.raises(httpx.HTTPStatusError) as missing:
                programasweights.list_compilers()
            assert missing.value.response.status_code == 401
        with official_client(tmp_path, url, api_key="wrong"):
            with pytest.raises(programasweights.APIError) as wrong:
                programasweights.precheck_compile(SPEC)
            assert wrong.value.response.status_code == 401
        with official_client(tmp_path, url, api_key="s3cret"):  # the client sends it as X-API-Key
            assert programasweights.list_compilers()[0]["name"] == "tiny-test"
        assert httpx.get(f"{url}/api/v1/models/compilers", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_paw_lite_serve_includes_the_paw_api(models, tmp_path):
    """The command line's app carries these routes (cli/serve.py adds them when the module is there)."""
    from paw_lite.cli.serve import _extra_routes

    paths = {route.path for route in _extra_routes(make_settings(tmp_path, models))}
    assert {"/api/v1/compile", "/api/v1/programs/{program_id}/download", "/api/v1/models/runtimes/{runtime_id}",
            "/api/v1/models/compilers", "/api/v1/infer"} <= paths



# -- both families: the Standard compiler beside the Compact one ---------------------------------

STD_RUNTIME = "tiny-qwen3-interp-f32"  # the tiny Qwen3 interpreter's file stem: a runtime the server serves


@pytest.fixture(scope="module")
def both_models(models, tmp_path_factory, vocab_dir) -> dict:
    """A models folder with both families' compiler files: the Compact ones of `models` (its
    interpreter as gpt2-q8_0.gguf) and the Standard ones on a tiny Qwen3 interpreter, which is also
    there as tiny-qwen3-interp-f32.gguf, the interpreter the Standard compiler is given by name."""
    folder = tmp_path_factory.mktemp("pawapi-both") / "models"
    folder.mkdir()
    for entry in models["dir"].iterdir():
        (folder / entry.name).symlink_to(entry.resolve())
    (folder / "gpt2-q8_0.gguf").symlink_to(models["gguf"])
    qwen = tiny_qwen(tmp_path_factory, vocab_dir)
    interp = tiny_standard_interpreter(tmp_path_factory, vocab_dir)
    standard_models_dir(folder, qwen, interp)
    (folder / f"{STD_RUNTIME}.gguf").symlink_to(interp[1])
    return {"dir": folder, "interp_hf": interp[0], "interp": folder / f"{STD_RUNTIME}.gguf"}


@pytest.fixture(scope="module")
def std_served(models, both_models, tmp_path_factory) -> dict:
    """A server with both compilers (the Standard one named by its meta and interpreter: the
    default), and the first Standard compile through the official client."""
    root = tmp_path_factory.mktemp("pawapi-std")
    d = both_models["dir"]
    files = ModelFiles(interpreter=both_models["interp"], compiler_meta=d / "paw-4b-qwen3-0.6b-meta.json")
    settings = make_settings(root, {**models, "dir": d}, compile_models=files)
    jobs = make_jobs(settings)
    with server(settings, jobs) as url, official_client(root, url):
        program = programasweights.compile(SPEC, compiler="paw-4b-qwen3-0.6b")
        yield {"url": url, "root": root, "settings": settings, "jobs": jobs, "program": program}


def test_both_compilers_are_listed_and_the_standard_one_compiles(std_served, tmp_path):
    program, jobs, url = std_served["program"], std_served["jobs"], std_served["url"]
    with official_client(tmp_path, url):
        listed = programasweights.list_compilers()
        assert [(c["name"], c["family"], c["interpreter"], c["runtime_id"], c["default"]) for c in listed] == [
            ("paw-4b-qwen3-0.6b-tiny-test", "standard", "Qwen/Qwen3-0.6B", STD_RUNTIME, True),
            ("tiny-test", "compact", "gpt2", "gpt2-q8_0", False)]
        assert listed[0]["aliases"][0] == "paw-4b-qwen3-0.6b" and listed[1]["aliases"][0] == "paw-4b-gpt2"
        assert (program.compiler_snapshot, program.runtime_id, jobs.compiles) == ("paw-4b-qwen3-0.6b-tiny-test", STD_RUNTIME, 1)
        stored = Program.load(std_served["settings"].compiled_dir / f"{program.id}.paw")
        assert stored.family.name == "standard" and stored.meta["interpreter"] == "Qwen/Qwen3-0.6B"
        assert stored.meta["runtime_id"] == STD_RUNTIME and stored.meta["prefix_steps"] is None
        # the default compiler (no 'compiler') is the Standard one here: the same program, no second compile
        assert programasweights.compile(SPEC).id == program.id and jobs.compiles == 1
        # an unknown compiler: 422 listing both
        with pytest.raises(programasweights.APIError) as unknown:
            programasweights.compile(SPEC, compiler="paw-9b-none")
        message = unknown.value.message
        assert unknown.value.response.status_code == 422
        assert "'paw-4b-qwen3-0.6b-tiny-test'" in message and "'tiny-test'" in message
    # compiler GGUFs are Qwen3 models too, and still never a runtime
    for stem in ("paw-4b-qwen3-0.6b-compiler-q8_0", "qwen3-4b-instruct-2507-q4_k_m", "paw-4b-gpt2-compiler-q8_0"):
        for suffix in ("", "/gguf"):
            assert httpx.get(f"{url}/api/v1/models/runtimes/{stem}{suffix}").status_code == 404, stem


def test_the_official_client_runs_the_standard_program_to_paw_lites_output(std_served, both_models, tmp_path):
    """`function(id)`: download, the importer's checks, the runtime manifest and the Qwen3 GGUF from the
    server, then the SDK's llama.cpp runtime: its greedy tokens equal paw_lite's, or part only at a
    near-tie of transformers + PEFT (fp32; the adapter is F32, llama.cpp's KV cache is f16)."""
    program_id = std_served["program"].id
    with official_client(tmp_path, std_served["url"]) as sdk:
        theirs = programasweights.function(program_id, n_ctx=STD_N_CTX)
        try:
            assert sdk_cache.has_valid_program_assets(program_id)
            manifest = httpx.get(f"{std_served['url']}/api/v1/models/runtimes/{STD_RUNTIME}").json()
            assert manifest["interpreter"] == "Qwen/Qwen3-0.6B" and manifest["local_sdk"]["n_ctx"] == STD_N_CTX
            assert sdk_cache.fetch_runtime_manifest(STD_RUNTIME, api_url=std_served["url"]) is not None
            assert (sdk / "base_models" / f"{STD_RUNTIME}.gguf").read_bytes() == both_models["interp"].read_bytes()
            ours_program = Program.load(std_served["settings"].compiled_dir / f"{program_id}.paw")
            assert (sdk / "programs" / program_id / "adapter.gguf").read_bytes() == ours_program.adapter_gguf
            PeftModel, AutoModelForCausalLM = oracle("peft").PeftModel, oracle("transformers").AutoModelForCausalLM
            torch = oracle("torch")
            with paw_lite.function(ours_program, base_model=both_models["interp"]) as ours:
                write_peft_dir(tmp_path / "peft", LoraAdapter.from_program(ours_program, ours.config))
                base = AutoModelForCausalLM.from_pretrained(both_models["interp_hf"], dtype=torch.float32)
                hf = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
                exact, _ = official_agrees(theirs, ours, hf, INPUTS, MAX_TOKENS, eos=ours.tokenizer.eos_ids[0])
                assert exact >= 1  # not resting on ties alone
                # hosted inference and the OpenAI face run it on the server: paw_lite's output
                with programasweights.function(program_id, remote=True) as remote:
                    assert remote(INPUTS[0], max_tokens=MAX_TOKENS) == ours(INPUTS[0], max_tokens=MAX_TOKENS)
                completion = openai.OpenAI(base_url=std_served["url"] + "/v1", api_key="none").completions.create(
                    model=program_id, prompt=INPUTS[1], max_tokens=MAX_TOKENS)
                assert completion.choices[0].text == ours(INPUTS[1], max_tokens=MAX_TOKENS)
        finally:
            theirs.close()


def test_the_published_standard_runtime_is_the_clients_own_manifest(std_served, tmp_path):
    served_manifest = httpx.get(f"{std_served['url']}/api/v1/models/runtimes/qwen3-0.6b-q6_k").json()
    assert served_manifest == sdk_cache.LEGACY_RUNTIME_MANIFESTS["qwen3-0.6b-q6_k"]
    with official_client(tmp_path, std_served["url"]):
        assert sdk_cache.fetch_runtime_manifest("qwen3-0.6b-q6_k", api_url=std_served["url"]) == served_manifest
