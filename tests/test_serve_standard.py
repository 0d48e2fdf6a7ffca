"""`paw-lite serve` with programs of both families in one folder: a Compact program (tiny GPT-2) and
a Standard one (tiny Qwen3 with the real Qwen vocabulary), each on its own family's interpreter,
driven by the official `openai` client. Every answer is compared with the same program called
in-process (`paw_lite.function` on the same interpreter file).

The server is given the GPT-2 interpreter (`interpreter`, the CLI's --base-model); the Standard
program's `qwen3-0.6b-q6_k.gguf` comes from the models directory (`models_dir`, --models). Without
that file the Standard program is refused on its request with the fix, and the Compact one goes on."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import paw_lite
from paw_lite.base_model import read_header
from paw_lite.families import STANDARD
from paw_lite.serve import batching
from paw_lite.serve.run import serving
from paw_lite.testing.qwen3 import random_qwen3_lora

from compiler_fixtures import tiny_qwen
from conftest import make_program, random_lora
from oracles import oracle
from serve_fixtures import WAIT, StepSpy, serve_settings
from standard_fixtures import make_standard_program

openai = oracle("openai")
httpx = oracle("httpx")

INPUTS = ["works great, five stars", "broke after a day", "naïve café — 東京 🤖", ""]
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["POSITIVE", "NEGATIVE"]}}, "required": ["label"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, vocab_dir):
    return tiny_qwen(tmp_path_factory, vocab_dir)  # (HF folder, F32 GGUF), shared with the other Standard tests


@pytest.fixture(scope="module")
def root(tmp_path_factory, qwen):
    """programs/ with alert.paw (Compact) and review.paw (Standard); models/ holding the Standard
    interpreter under its runtime's name; an empty models directory for $PAW_LITE_MODELS."""
    root = tmp_path_factory.mktemp("serve-std")
    (root / "programs").mkdir()
    make_program(root / "programs" / "alert.paw", random_lora(2, 64, 32, seed=1), 16.0)
    config, _ = read_header(qwen[1])
    make_standard_program(root / "programs" / "review.paw", random_qwen3_lora(config, 32, std=0.08))
    (root / "models").mkdir()
    (root / "models" / f"{STANDARD.runtime_id}.gguf").symlink_to(qwen[1])
    (root / "no-models").mkdir()
    return root


@pytest.fixture(scope="module", autouse=True)
def no_user_models(root):
    """paw_lite's own models directory is an empty folder: only what a test gives is found."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAW_LITE_MODELS", str(root / "no-models"))
        yield


@pytest.fixture(scope="module")
def fns(root, qwen, tiny_gguf):
    """The served programs called in-process: the oracle for every answer."""
    out = {"alert": paw_lite.function(root / "programs" / "alert.paw", base_model=tiny_gguf, cache_dir=root / "cache"),
           "review": paw_lite.function(root / "programs" / "review.paw", base_model=qwen[1], cache_dir=root / "cache")}
    yield out
    for fn in out.values():
        fn.close()


@pytest.fixture(scope="module")
def settings(root, tiny_gguf):
    return serve_settings(root, tiny_gguf, models_dir=root / "models")


@pytest.fixture(scope="module")
def url(settings):
    with serving(settings) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=WAIT) as c:
        yield c


def test_both_families_are_listed_and_each_runs_on_its_interpreter(client, fns):
    assert sorted(m.id for m in client.models.list()) == ["alert", "review"]
    for name in ("review", "alert"):
        for text in INPUTS:
            r = client.completions.create(model=name, prompt=text, max_tokens=10)
            ids = fns[name].generate_ids(text, 10)
            assert r.choices[0].text == fns[name](text, 10)
            assert r.usage.prompt_tokens == len(fns[name].prompt_ids(text))
            assert r.usage.completion_tokens == len(ids)
            assert r.choices[0].finish_reason == ("length" if len(ids) == 10 else "stop")
    assert fns["review"].family.name == "standard" and fns["alert"].family.name == "compact"


def test_standard_batch_chat_and_streams(client, fns):
    fn = fns["review"]
    r = client.completions.create(model="review", prompt=INPUTS, max_tokens=8)
    assert [c.text for c in r.choices] == [fn(t, 8) for t in INPUTS]
    r = client.chat.completions.create(model="review", messages=[{"role": "system", "content": "ignored"},
                                                                 {"role": "user", "content": INPUTS[1]}], max_tokens=8)
    assert r.choices[0].message.content == fn(INPUTS[1], 8)
    chunks = list(client.completions.create(model="review", prompt=INPUTS[:2], max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    for i, text in enumerate(INPUTS[:2]):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == fn(text, 8)
    assert chunks[-1].usage.completion_tokens == sum(len(fn.generate_ids(t, 8)) for t in INPUTS[:2])
    stream = client.chat.completions.create(model="review", messages=[{"role": "user", "content": INPUTS[0]}],
                                            max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == fn(INPUTS[0], 8)


def _expected(fn, text: str, max_tokens: int, **constraint) -> tuple[str, str]:
    """(text, finish_reason) the server should answer: the in-process output, or, for a constrained
    output the limit cut (a random tiny model may pad with whitespace), its partial text and "length"."""
    try:
        return fn(text, max_tokens, **constraint), "stop"
    except paw_lite.IncompleteOutputError as cut:
        return cut.partial.lstrip(" \t\r\n"), "length"


@pytest.mark.parametrize("field, keyword, value", [
    ("choices", "choices", ["POSITIVE", "NEGATIVE"]), ("regex", "regex", "[A-Z]{2,4}-[0-9]{2}"),
    ("guided_json", "json_schema", SCHEMA)])
def test_standard_constraints(client, fns, field, keyword, value):
    fn = fns["review"]
    for text in INPUTS[:2]:
        r = client.completions.create(model="review", prompt=text, max_tokens=16, extra_body={field: value})
        assert (r.choices[0].text, r.choices[0].finish_reason) == _expected(fn, text, 16, **{keyword: value})
    stream = client.completions.create(model="review", prompt=INPUTS[0], max_tokens=16, stream=True,
                                       extra_body={field: value})
    assert "".join(c.choices[0].text for c in stream if c.choices) == _expected(fn, INPUTS[0], 16, **{keyword: value})[0]


def test_concurrent_requests_to_both_families(client, fns):
    asks = [(name, text) for text in INPUTS for name in ("review", "alert")]
    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(lambda a: client.completions.create(model=a[0], prompt=a[1], max_tokens=8).choices[0].text,
                            asks))
    assert got == [fns[name](text, 8) for name, text in asks]


def test_standard_requests_join_a_running_batch(client, fns, monkeypatch):
    """Requests that arrive while the Standard program's batch runs share its steps (ordered with
    events: the first step is held until every request is submitted)."""
    texts = INPUTS[:3]
    spy = StepSpy(hold_from=0).install(monkeypatch)
    submitted = threading.Semaphore(0)
    real_submit = batching.ProgramWorker.submit
    monkeypatch.setattr(batching.ProgramWorker, "submit", lambda self, job: (real_submit(self, job), submitted.release()))
    with ThreadPoolExecutor(len(texts)) as pool:
        first = pool.submit(client.completions.create, model="review", prompt=texts[0], max_tokens=8)
        assert spy.held.wait(WAIT)
        rest = [pool.submit(client.completions.create, model="review", prompt=t, max_tokens=8) for t in texts[1:]]
        for _ in texts:
            assert submitted.acquire(timeout=WAIT)
        spy.release.set()
        outs = [f.result(WAIT).choices[0].text for f in [first, *rest]]
    assert outs == [fns["review"](t, 8) for t in texts]
    assert spy.sizes[0] == 1 and max(spy.sizes) == len(texts)


def test_a_program_without_its_interpreter_is_refused_with_the_fix(root, tiny_gguf, fns):
    """One interpreter given (GPT-2), no qwen3-0.6b-q6_k.gguf anywhere: the Standard program's requests
    get a 500 JSON error naming the file and how to get it; the Compact program is served meanwhile."""
    with serving(serve_settings(root, tiny_gguf)) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=WAIT)
        for _ in range(2):  # a refusal is not kept broken: asked again, it says the same
            with pytest.raises(openai.InternalServerError) as e:
                c.completions.create(model="review", prompt="x", max_tokens=3)
            message = e.value.body["message"]
            assert e.value.body["code"] == "model_load_failed"
            assert "review.paw is a Standard program" in message and f"{STANDARD.runtime_id}.gguf" in message
            assert "--models DIR" in message and "paw-lite models pull --family standard" in message
        assert c.completions.create(model="alert", prompt="x", max_tokens=5).choices[0].text == fns["alert"]("x", 5)
        assert httpx.get(base + "/health", timeout=WAIT).json() == {"status": "ok"}


def test_with_no_interpreter_given_each_program_finds_its_own(root, tiny_gguf, fns):
    """No --base-model: each program's <runtime_id>.gguf from the models directories (here the
    Compact one names the tiny GPT-2's file, put there under that name)."""
    models = root / "models-both"
    models.mkdir()
    (models / f"{STANDARD.runtime_id}.gguf").symlink_to(root / "models" / f"{STANDARD.runtime_id}.gguf")
    (models / "gpt2-q8_0.gguf").symlink_to(tiny_gguf)
    settings = serve_settings(root, None, models_dir=models)
    with serving(settings) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=WAIT)
        for name in ("alert", "review"):
            assert c.completions.create(model=name, prompt=INPUTS[0], max_tokens=6).choices[0].text == \
                fns[name](INPUTS[0], 6)
