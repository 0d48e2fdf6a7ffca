"""Ctrl-C stops llama.cpp itself, not only the Python after it: a pending interrupt makes
llama.cpp's abort callback end an evaluation (llama_decode returns 2, "aborted") and its
load-progress callback cancel a model load (NULL). Before, the encoder pass (~30 s on a 4B
compiler) ran to its end first. Checked on the real library with a tiny compiler model."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from oracles import oracle
from compiler_fixtures import tiny_qwen

llama_cpp = oracle("llama_cpp")

from paw_lite.compiler.llama import ContextSettings, LlamaModel  # noqa: E402

pytestmark = [pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals"),
              pytest.mark.usefixtures("python_ctrl_c")]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory, vocab_dir):
    return tiny_qwen(tmp_path_factory, vocab_dir)[1]


def _ctrl_c_then(monkeypatch, name: str, results: list, ctrl_c: bool = True) -> None:
    """Replace llama_cpp.<name> by a call that first sends this process SIGINT (a Ctrl-C that
    arrives as the C call starts; not with ctrl_c=False) and records what the real call returns."""
    real = getattr(llama_cpp, name)

    def call(*args):
        if ctrl_c:
            os.kill(os.getpid(), signal.SIGINT)
        results.append(real(*args))
        return results[-1]

    monkeypatch.setattr(llama_cpp, name, call)


def _ids(model: LlamaModel) -> list[int]:
    return model.tokenize("Classify a log line as ALERT or QUIET. " * 3, special=False)[:24]


def test_an_evaluation_runs_to_its_end_without_an_interrupt(gguf, monkeypatch):
    """The control: the same wrapper without the signal sees llama_decode succeed."""
    results = []
    _ctrl_c_then(monkeypatch, "llama_decode", results, ctrl_c=False)
    with LlamaModel(gguf) as model, model.context(ContextSettings(n_ctx=64, n_ubatch=32)) as ctx:
        ctx.decode(_ids(model))
    assert results == [0]


def test_ctrl_c_aborts_a_llama_cpp_evaluation(gguf, monkeypatch):
    with LlamaModel(gguf) as model, model.context(ContextSettings(n_ctx=64, n_ubatch=32)) as ctx:
        ids = _ids(model)
        results = []
        _ctrl_c_then(monkeypatch, "llama_decode", results)
        with pytest.raises(KeyboardInterrupt):
            ctx.decode(ids)
        assert results == [2]  # aborted by the callback, not evaluated to the end
        assert ctx.n_past == 0
        monkeypatch.undo()
        ctx.truncate(0)
        ctx.decode(ids)  # the context is still usable
        assert ctx.n_past == len(ids)


def test_ctrl_c_cancels_a_model_load(gguf, monkeypatch):
    results = []
    _ctrl_c_then(monkeypatch, "llama_model_load_from_file", results)
    with pytest.raises(KeyboardInterrupt):
        LlamaModel(gguf)
    assert len(results) == 1 and not results[0]  # llama.cpp stopped loading: no model
    monkeypatch.undo()
    with LlamaModel(gguf) as model:  # nothing left behind that stops the next load
        assert model.n_layer == 4


def test_under_another_sigint_handler_no_python_runs_between_graph_nodes(gguf):
    """A handler someone else installed (asyncio's, an application's) must not run inside C, where
    ctypes would swallow what it raises: the abort callback is only installed while the Ctrl-C is
    paw_lite's to record, and removed after the call."""
    calls = []

    def counting() -> bool:
        calls.append(1)
        return False

    def theirs(signum, frame):
        raise RuntimeError("their handler")

    with LlamaModel(gguf) as model, model.context(ContextSettings(n_ctx=64, n_ubatch=32)) as ctx:
        ids = _ids(model)
        old = signal.signal(signal.SIGINT, theirs)
        try:
            ctx._interrupted = counting  # what llama.cpp would call per node, had it a callback
            ctx.decode(ids[:8])
        finally:
            signal.signal(signal.SIGINT, old)
        assert calls == [] and ctx.n_past == 8
        ctx._interrupted = counting
        ctx.decode(ids[8:16])  # Python's own handler: the callback is installed for the call ...
        assert ctx._interrupted is not counting and ctx.n_past == 16  # ... and taken away after it
