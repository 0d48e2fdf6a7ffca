"""`paw-lite serve`: the real server on a free loopback port, driven by the official `openai` client
(httpx, which it is built on, for what that client cannot send: malformed JSON, raw paths). Every
answer is compared with the same program called in-process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import paw_lite
from paw_lite.serve import batching
from paw_lite.serve.app import build_app
from paw_lite.serve.run import ServerThread, bind, serving
from paw_lite.serve.settings import ServeSettings, ServeSettingsError
from paw_lite.serve.store import ProgramStore, UnknownProgramError, is_valid_name

from oracles import oracle
from serve_fixtures import WAIT, StepSpy, make_programs, serve_settings

openai = oracle("openai")
httpx = oracle("httpx")  # the openai client's HTTP library

INPUTS = ["disk usage at 99% on /var", "user logged in", "ünïcödé ✓", "kernel panic - not syncing", ""]
SCHEMA = {"type": "object", "properties": {"level": {"enum": ["ALERT", "QUIET"]}}, "required": ["level"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    make_programs(root / "programs")
    return root


@pytest.fixture(scope="module")
def settings(root, tiny_gguf) -> ServeSettings:
    return serve_settings(root, tiny_gguf)


@pytest.fixture(scope="module")
def fns(root, tiny_gguf):
    """The served programs called in-process: the oracle for every answer."""
    out = {name: paw_lite.function(root / "programs" / f"{name}.paw", base_model=tiny_gguf, cache_dir=root / "cache")
           for name in ("alert", "beta")}
    yield out
    for fn in out.values():
        fn.close()


@pytest.fixture(scope="module")
def url(settings):
    with serving(settings) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=WAIT) as c:
        yield c


def _still_serving(client, fns):
    r = client.completions.create(model="alert", prompt="still there?", max_tokens=5)
    assert r.choices[0].text == fns["alert"]("still there?", 5)


# -- the OpenAI face ---------------------------------------------------------------------------

def test_models_lists_every_program_by_file_stem(client):
    assert sorted(m.id for m in client.models.list()) == ["alert", "beta"]
    assert client.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gamma")


def test_completion_equals_the_in_process_call(client, fns):
    for name in ("alert", "beta"):
        for text in INPUTS:
            r = client.completions.create(model=name, prompt=text, max_tokens=12)
            assert r.choices[0].text == fns[name](text, 12)
            ids = fns[name].generate_ids(text, 12)
            assert r.usage.prompt_tokens == len(fns[name].prompt_ids(text))
            assert r.usage.completion_tokens == len(ids)
            assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
            assert r.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")
            assert r.model == name and r.object == "text_completion"


def test_a_list_of_prompts_is_a_batch(client, fns):
    r = client.completions.create(model="alert", prompt=INPUTS, max_tokens=10)
    assert [c.index for c in r.choices] == list(range(len(INPUTS)))
    assert [c.text for c in r.choices] == [fns["alert"](t, 10) for t in INPUTS]
    assert r.usage.prompt_tokens == sum(len(fns["alert"].prompt_ids(t)) for t in INPUTS)
    assert r.usage.completion_tokens == sum(len(fns["alert"].generate_ids(t, 10)) for t in INPUTS)


def test_default_max_tokens_is_the_cap(client, fns, settings):
    r = client.completions.create(model="beta", prompt="user logged in")
    assert r.choices[0].text == fns["beta"]("user logged in", settings.max_tokens_cap)


def test_max_tokens_zero_gives_an_empty_output(client):
    r = client.completions.create(model="alert", prompt="x", max_tokens=0)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 0


def test_chat_takes_the_last_user_message(client, fns):
    messages = [{"role": "system", "content": "ignored: the program is the instruction"},
                {"role": "user", "content": "first question"}, {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": "disk usage at 99% on /var"}]
    r = client.chat.completions.create(model="alert", messages=messages, max_tokens=12)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == fns["alert"]("disk usage at 99% on /var", 12)
    assert r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(fns["alert"].prompt_ids("disk usage at 99% on /var"))
    parts = [{"type": "text", "text": "disk usage "}, {"type": "text", "text": "at 99% on /var"}]
    r = client.chat.completions.create(model="alert", messages=[{"role": "user", "content": parts}], max_tokens=12)
    assert r.choices[0].message.content == fns["alert"]("disk usage at 99% on /var", 12)


def test_streamed_completion_concatenates_to_the_output(client, fns):
    for text in INPUTS:
        chunks = list(client.completions.create(model="beta", prompt=text, max_tokens=20, stream=True,
                                                stream_options={"include_usage": True}))
        pieces = [c.choices[0].text for c in chunks if c.choices]
        assert "".join(pieces) == fns["beta"](text, 20)
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(fns["beta"].generate_ids(text, 20))
    # several tokens make several chunks (the stream is not one piece at the end)
    chunks = list(client.completions.create(model="beta", prompt=INPUTS[0], max_tokens=20, stream=True))
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1


def test_streamed_batch_keeps_each_input_apart(client, fns):
    chunks = list(client.completions.create(model="alert", prompt=INPUTS[:3], max_tokens=15, stream=True))
    for i, text in enumerate(INPUTS[:3]):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == fns["alert"](text, 15)


def test_streamed_chat(client, fns):
    stream = client.chat.completions.create(model="alert", messages=[{"role": "user", "content": "user logged in"}],
                                            max_tokens=20, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == fns["alert"]("user logged in", 20)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_raw_stream_is_openai_sse_ending_with_done(url):
    with httpx.stream("POST", url + "/v1/completions", json={"model": "alert", "prompt": "x", "max_tokens": 3,
                                                               "stream": True}, timeout=WAIT) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


# -- constrained outputs -----------------------------------------------------------------------

def test_response_format_json_schema(client, fns):
    fmt = {"type": "json_schema", "json_schema": {"name": "level", "schema": SCHEMA, "strict": True}}
    for text in INPUTS[:3]:
        r = client.chat.completions.create(model="alert", messages=[{"role": "user", "content": text}],
                                           max_tokens=64, response_format=fmt)
        out = r.choices[0].message.content
        assert out == fns["alert"](text, 64, json_schema=SCHEMA)
        assert json.loads(out)["level"] in ("ALERT", "QUIET") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="beta", prompt=INPUTS[0], max_tokens=64, extra_body={"response_format": fmt})
    assert r.choices[0].text == fns["beta"](INPUTS[0], 64, json_schema=SCHEMA)


@pytest.mark.parametrize("field, keyword, value", [
    ("choices", "choices", ["ALERT", "QUIET"]), ("guided_choice", "choices", ["yes", "no", "maybe"]),
    ("regex", "regex", "[A-Z]{2,4}-[0-9]{2}"), ("guided_regex", "regex", "(up|down) [0-9]+"),
    ("guided_json", "json_schema", SCHEMA)])
def test_constraint_fields(client, fns, field, keyword, value):
    for text in INPUTS[:3]:
        r = client.completions.create(model="alert", prompt=text, max_tokens=40, extra_body={field: value})
        assert r.choices[0].text == fns["alert"](text, 40, **{keyword: value})
    stream = client.completions.create(model="alert", prompt=INPUTS[0], max_tokens=40, stream=True,
                                       extra_body={field: value})
    assert "".join(c.choices[0].text for c in stream if c.choices) == fns["alert"](INPUTS[0], 40, **{keyword: value})


def test_a_cut_constrained_output_is_partial_with_finish_reason_length(client, fns):
    with pytest.raises(paw_lite.IncompleteOutputError) as cut:
        fns["alert"]("x", 2, regex="[a-z]{30}")
    r = client.completions.create(model="alert", prompt="x", max_tokens=2, extra_body={"regex": "[a-z]{30}"})
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].text == cut.value.partial.lstrip()


def test_bad_constraints_are_400_naming_the_field(client, fns):
    cases = [({"choices": []}, "choices"), ({"guided_choice": "ALERT"}, "guided_choice"), ({"regex": 5}, "regex"), ({"regex": "("}, "regex"), ({"choices": ["a"], "regex": "b"}, "regex"),
             ({"response_format": {"type": "json_schema"}}, "response_format"),
             ({"response_format": {"type": "xml"}}, "response_format")]
    for body, field in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="alert", prompt="x", max_tokens=5, extra_body=body)
        assert e.value.body["param"] == field, body
    _still_serving(client, fns)


# -- errors ------------------------------------------------------------------------------------

def test_unknown_and_traversal_model_names_are_404(client, url, fns):
    for name in ("gamma", "../alert", "..", "alert/../alert", "programs/alert", ".alert", "alert.paw", "a\\b",
                 "%2e%2e%2falert", "x" * 500):
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model=name, prompt="x", max_tokens=3)
        assert e.value.body["code"] == "model_not_found"
    for path in ("/v1/models/../../etc/passwd", "/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/models/%2e%2e"):
        r = httpx.get(url + path, timeout=WAIT)
        assert r.status_code == 404  # httpx may normalise the dots away: then no route matches
    _still_serving(client, fns)


def test_names_outside_the_folders_are_refused_by_the_store(settings):
    assert not any(is_valid_name(n) for n in ("..", "../x", "a/b", "a\\b", ".hidden", "", None, "a" * 200, "x..y"))
    store = ProgramStore(settings)
    with pytest.raises(UnknownProgramError):
        store.file("../programs/alert")


def test_malformed_and_wrong_requests_are_400(client, url, fns):
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=WAIT)
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error"
    for body in ({"prompt": "x"}, {"model": "alert"}, {"model": "alert", "prompt": [1, 2]},
                 {"model": "alert", "prompt": "x", "max_tokens": -1}, {"model": "alert", "prompt": "x", "max_tokens": 1.5},
                 {"model": "alert", "prompt": "x", "n": 2}, {"model": "alert", "prompt": "x", "stop": ["\n"]},
                 {"model": "alert", "prompt": "x", "logprobs": 3}, {"model": "alert", "prompt": ["x"] * 9}):
        r = httpx.post(url + "/v1/completions", json=body, timeout=WAIT)
        assert r.status_code == 400, body
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url + "/v1/completions", content=b'{"model": "alert", "prompt": "\\ud800"}', timeout=WAIT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"  # a lone surrogate
    r = httpx.post(url + "/v1/chat/completions", json={"model": "alert", "messages": [{"role": "system", "content": "x"}]},
                   timeout=WAIT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    _still_serving(client, fns)


def test_limits_are_4xx_and_leave_the_server_serving(client, url, settings, fns):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alert", prompt="x", max_tokens=settings.max_tokens_cap + 1)
    assert e.value.body["code"] == "max_tokens_too_large" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alert", prompt="y" * (settings.max_input_chars + 1), max_tokens=3)
    assert e.value.body["code"] == "input_too_long"
    with pytest.raises(openai.BadRequestError) as e:  # fits the limits, not the tiny model's 128-token context
        client.completions.create(model="alert", prompt="word " * 400, max_tokens=3)
    assert e.value.body["code"] == "context_length_exceeded"
    big = b'{"model": "alert", "prompt": "' + b"z" * settings.max_body_bytes + b'"}'
    r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=WAIT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked():  # no Content-Length: refused while read
        for _ in range(settings.max_body_bytes // 1024 + 2):
            yield b" " * 1024

    r = httpx.post(url + "/v1/completions", content=chunked(), timeout=WAIT)
    assert r.status_code == 413
    r = httpx.post(url + "/api/v1/anything", content=big, timeout=WAIT)  # the PAW face's shape
    assert r.status_code == 413 and "detail" in r.json()
    _still_serving(client, fns)


def test_concurrency_limit_is_429(root, tiny_gguf, fns, monkeypatch):
    spy = StepSpy(hold_from=0).install(monkeypatch)  # the first request stays in evaluation
    with serving(serve_settings(root, tiny_gguf, max_concurrent=2)) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=WAIT)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.completions.create, model="alert", prompt=["a", "b"], max_tokens=4)
            assert spy.held.wait(WAIT)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model="alert", prompt="c", max_tokens=4)
            assert e.value.body["code"] == "too_many_requests"
            spy.release.set()
            assert [ch.text for ch in first.result(WAIT).choices] == [fns["alert"](t, 4) for t in "ab"]
        assert c.completions.create(model="alert", prompt="c", max_tokens=4).choices[0].text == fns["alert"]("c", 4)


def test_api_key_is_required_on_every_route(root, tiny_gguf, fns):
    settings = serve_settings(root, tiny_gguf, api_key="s3cret")
    with serving(settings) as base:
        for key in ("wrong", "s3cretx", "s3cre"):
            bad = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=WAIT)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model="alert", prompt="x", max_tokens=3)
        for path, shape in (("/v1/models", "error"), ("/api/v1/programs/x", "detail"), ("/nowhere", "detail"),
                            ("/health", "detail")):
            r = httpx.get(base + path, timeout=WAIT)
            assert r.status_code == 401 and shape in r.json(), path
            assert r.headers["www-authenticate"] == "Bearer"
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0, timeout=WAIT)
        assert good.completions.create(model="alert", prompt="x", max_tokens=5).choices[0].text == fns["alert"]("x", 5)


def test_health(url):
    assert httpx.get(url + "/health", timeout=WAIT).json() == {"status": "ok"}


def test_connections_have_nagle_off():
    """The listening socket asyncio (so uvicorn) serves on: its connections must send at once.
    asyncio sets TCP_NODELAY only on sockets made as IPPROTO_TCP; on one made with protocol 0,
    Nagle held every response's body write until the client's delayed ACK of its headers, ~40 ms
    a request (a lone request took 44 ms more than the in-process call)."""
    async def nodelay_of_accepted() -> int:
        loop = asyncio.get_running_loop()
        sock = bind("127.0.0.1", 0)
        accepted = loop.create_future()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                                socket.TCP_NODELAY))

        server = await loop.create_server(Accept, sock=sock)
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            try:
                return await asyncio.wait_for(accepted, WAIT)
            finally:
                writer.close()
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(nodelay_of_accepted()) != 0


def test_unknown_routes_are_404_in_each_faces_shape(url):
    r = httpx.get(url + "/v1/nothing", timeout=WAIT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(url + "/api/v1/nothing", timeout=WAIT)
    assert r.status_code == 404 and "detail" in r.json()
    assert httpx.get(url + "/v1/completions", timeout=WAIT).status_code == 405


def test_extra_routes_get_the_key_limits_and_error_shapes(root, tiny_gguf):
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from paw_lite.serve.errors import ApiError

    async def echo(request):
        body = await request.body()
        if body == b"fail":
            raise ApiError(409, "no such thing", code="conflict")
        return JSONResponse({"n": len(body)})

    settings = serve_settings(root, tiny_gguf, api_key="k", max_body_bytes=100)
    app = build_app(settings, extra_routes=[Route("/api/v1/echo", echo, methods=["POST"])])
    with serving(settings, app) as base:
        auth = {"Authorization": "Bearer k"}
        assert httpx.post(base + "/api/v1/echo", content=b"abc", headers=auth).json() == {"n": 3}
        assert httpx.post(base + "/api/v1/echo", content=b"abc").status_code == 401
        r = httpx.post(base + "/api/v1/echo", content=b"x" * 101, headers=auth)
        assert r.status_code == 413 and "detail" in r.json()
        r = httpx.post(base + "/api/v1/echo", content=b"fail", headers=auth)
        assert r.status_code == 409 and r.json() == {"detail": "no such thing"}


def test_settings_are_checked():
    with pytest.raises(ServeSettingsError, match="max_tokens_cap"):
        ServeSettings(programs_dir="p", data_dir="d", max_tokens_cap=0)
    with pytest.raises(ServeSettingsError, match="port"):
        ServeSettings(programs_dir="p", data_dir="d", port=70000)
    with pytest.raises(ServeSettingsError, match="compile_threads"):
        ServeSettings(programs_dir="p", data_dir="d", compile_threads=0)


# -- the store ---------------------------------------------------------------------------------

def test_programs_appearing_later_are_served(root, tiny_gguf, client, fns):
    compiled = root / "data" / "compiled"
    compiled.mkdir(parents=True, exist_ok=True)
    (compiled / "c0ffee.paw").write_bytes((root / "programs" / "beta.paw").read_bytes())
    assert "c0ffee" in [m.id for m in client.models.list()]
    r = client.completions.create(model="c0ffee", prompt="user logged in", max_tokens=8)
    assert r.choices[0].text == fns["beta"]("user logged in", 8)


def test_concurrent_first_requests_load_a_program_once(settings, monkeypatch):
    store = ProgramStore(settings)
    loads = []
    real = store._load
    monkeypatch.setattr(store, "_load", lambda entry: loads.append(entry.name) or real(entry))
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(store.function, ["alert"] * 6))
    assert loads == ["alert"] and all(f is got[0] for f in got)
    assert store.function("beta").config is got[0].config  # one interpreter, shared
    store.close()


def test_least_recently_used_programs_are_unloaded(root, tiny_gguf, fns):
    settings = serve_settings(root, tiny_gguf, max_loaded=1)
    app = build_app(settings)
    with serving(settings, app) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=WAIT)
        for name in ("alert", "beta", "alert", "beta"):
            assert c.completions.create(model=name, prompt="user logged in", max_tokens=6).choices[0].text == \
                fns[name]("user logged in", 6)
            assert list(app.state.store.loaded()) == [name]


def test_a_request_that_meets_an_unloaded_worker_is_retried(client, fns, monkeypatch):
    real_submit, refused = batching.ProgramWorker.submit, []

    def submit_once_refused(self, job):
        if not refused:
            refused.append(job)
            raise batching.WorkerClosedError("unloaded meanwhile")
        real_submit(self, job)

    monkeypatch.setattr(batching.ProgramWorker, "submit", submit_once_refused)
    r = client.completions.create(model="beta", prompt=["a", "b"], max_tokens=6)
    assert refused and [ch.text for ch in r.choices] == [fns["beta"](t, 6) for t in "ab"]


# -- batching across requests ------------------------------------------------------------------

def test_load_from_many_clients_loses_and_mixes_nothing(client, fns):
    """24 requests from 8 threads over 2 programs: every answer is its own input's in-process output."""
    work = [(["alert", "beta"][i % 2], f"event {i}: " + INPUTS[i % len(INPUTS)], 6 + i % 5) for i in range(24)]

    def one(job):
        name, text, n = job
        r = client.completions.create(model=name, prompt=text, max_tokens=n)
        return r.id, r.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, work))
    assert len({rid for rid, _ in results}) == len(work)
    assert [out for _, out in results] == [fns[name](text, n) for name, text, n in work]


def test_requests_arriving_together_share_a_batch(client, fns, monkeypatch):
    texts = ["disk usage at 99% on /var", "user logged in", "kernel panic", "cpu at 100%"]
    assert len(fns["alert"].generate_ids(texts[0], 8)) >= 2  # the first request is still running at step 2
    spy = StepSpy(hold_from=0).install(monkeypatch)
    submitted = threading.Semaphore(0)
    real_submit = batching.ProgramWorker.submit
    monkeypatch.setattr(batching.ProgramWorker, "submit", lambda self, job: (real_submit(self, job), submitted.release()))
    with ThreadPoolExecutor(len(texts)) as pool:
        first = pool.submit(client.completions.create, model="alert", prompt=texts[0], max_tokens=8)
        assert spy.held.wait(WAIT)  # the worker holds the first request's first step
        rest = [pool.submit(client.completions.create, model="alert", prompt=t, max_tokens=8) for t in texts[1:]]
        for _ in texts:
            assert submitted.acquire(timeout=WAIT)
        spy.release.set()
        outs = [f.result(WAIT).choices[0].text for f in [first, *rest]]
    assert outs == [fns["alert"](t, 8) for t in texts]
    assert spy.sizes[0] == 1 and max(spy.sizes) == len(texts)  # the three joined the running batch


def test_a_client_that_goes_away_frees_its_slot(url, client, fns, monkeypatch):
    text = "disk usage at 99% on /var"
    assert len(fns["alert"].generate_ids(text, 40)) >= 3
    spy = StepSpy(hold_from=1).install(monkeypatch)  # step 2 waits until the server cancels the job
    cancelled, dropped = threading.Event(), []
    real_cancel = batching.ProgramWorker.cancel
    monkeypatch.setattr(batching.ProgramWorker, "cancel",
                        lambda self, job: (real_cancel(self, job), cancelled.set(), spy.release.set()))
    from paw_lite import scheduler

    real_drop = scheduler.Batch.drop
    gone = threading.Event()
    monkeypatch.setattr(scheduler.Batch, "drop",
                        lambda batch, key: (dropped.append(key in batch.seqs), real_drop(batch, key), gone.set()))
    body = {"model": "alert", "messages": [{"role": "user", "content": text}], "max_tokens": 40, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=WAIT) as r:  # closed on leaving
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response when collected
        assert next(lines).startswith("data: ")  # the role chunk
        assert spy.held.wait(WAIT)  # the request made its first token and is in flight
        assert not cancelled.is_set()
    assert gone.wait(WAIT) and cancelled.is_set()
    assert dropped == [True]  # it was still in flight, and left the batch
    _still_serving(client, fns)


def test_stop_drains_an_in_flight_request(settings, fns, monkeypatch):
    spy = StepSpy(hold_from=0).install(monkeypatch)
    server = ServerThread(settings)
    base = server.start()
    c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=WAIT)
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(c.completions.create, model="beta", prompt="user logged in", max_tokens=8)
        assert spy.held.wait(WAIT)  # in evaluation
        stopped = pool.submit(server.stop)
        assert server.stopping.wait(WAIT)  # the shutdown has begun while the request is in flight
        spy.release.set()
        assert answer.result(WAIT).choices[0].text == fns["beta"]("user logged in", 8)
        stopped.result(WAIT)
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/v1/models", timeout=WAIT)


def test_cli_serves_until_sigterm(root, tiny_gguf, fns):
    env = {**os.environ, "PAW_LITE_API_KEY": "from-env", "PAW_LITE_CACHE": str(root / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "paw_lite", "serve", "--programs", str(root / "programs"),
                             "--port", "0", "--base-model", str(tiny_gguf), "--data-dir", str(root / "data"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["host"] == "127.0.0.1" and ready["api_key_required"] and "alert" in ready["models"]
        c = openai.OpenAI(base_url=ready["openai_base_url"], api_key="from-env", max_retries=0, timeout=WAIT)
        assert c.completions.create(model="alert", prompt="x", max_tokens=5).choices[0].text == fns["alert"]("x", 5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_bad_options_as_json(root, tmp_path):
    from paw_lite.cli import main

    assert main(["serve", "--programs", str(tmp_path / "missing"), "--json"]) == 2
    assert main(["serve", "--programs", str(root / "programs"), "--max-tokens-cap", "0", "--json"]) == 2
    assert main(["serve", "--programs", str(root / "programs"), "--compile-threads", "0", "--json"]) == 2


def test_compile_threads_reach_the_compile_jobs(root, tmp_path):
    """--compile-threads is the thread count of the server's compile jobs (every core by default)."""
    from paw_lite.cli import build_parser
    from paw_lite.cli.serve import settings_from_args
    from paw_lite.serve.paw_api import compile_jobs

    def jobs_of(*flags):
        args = build_parser().parse_args(["serve", "--programs", str(root / "programs"), "--data-dir",
                                          str(tmp_path / "data"), *flags])
        return compile_jobs(settings_from_args(args))

    assert jobs_of("--compile-threads", "1").options.n_threads == 1
    assert jobs_of().options.n_threads is None
