"""Shared pieces of the server tests: a folder of small random GPT-2 programs and settings that
serve it on a free loopback port, and a spy on the batch scheduler's steps that can hold the
worker at a step (to order a test with events, never with sleeps)."""

from __future__ import annotations

import threading
from pathlib import Path

from conftest import make_program, random_lora

from paw_lite import scheduler
from paw_lite.serve.settings import ServeSettings

# Generous bound on any wait for the server's worker thread (a busy 2-core host); never a timing claim.
WAIT = 60.0


def make_programs(folder: Path) -> dict[str, Path]:
    """Two programs on the tiny GPT-2 (different LoRAs): {model name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    return {"alert": make_program(folder / "alert.paw", random_lora(2, 64, 32, seed=1), 16.0),
            "beta": make_program(folder / "beta.paw", random_lora(2, 64, 32, seed=2), 16.0)}


def serve_settings(root: Path, interpreter: Path, **limits) -> ServeSettings:
    """Settings serving root/programs on a free port of 127.0.0.1, every program on `interpreter`."""
    values = dict(max_body_bytes=64 * 1024, max_input_chars=2000, max_batch=8, max_concurrent=64, max_tokens_cap=64,
                  batch_size=8)
    values.update(limits)
    return ServeSettings(programs_dir=root / "programs", data_dir=root / "data", port=0, interpreter=interpreter,
                         cache_dir=root / "cache", **values)


class StepSpy:
    """Wraps scheduler.Batch.step (install with monkeypatch): records how many sequences each step
    held, and makes steps from number `hold_from` on wait for `release` (when hold_from is set)."""

    def __init__(self, hold_from: int | None = None):
        self.sizes: list[int] = []
        self.hold_from = hold_from
        self.release = threading.Event()
        self.entered = threading.Event()  # a step began
        self.held = threading.Event()  # a step is waiting for release
        self._step = scheduler.Batch.step

    def install(self, monkeypatch) -> "StepSpy":
        spy = self

        def step(batch):
            spy.sizes.append(len(batch))
            spy.entered.set()
            if spy.hold_from is not None and len(spy.sizes) > spy.hold_from:
                spy.held.set()
                assert spy.release.wait(WAIT), "the test never released the held step"
            return spy._step(batch)

        monkeypatch.setattr(scheduler.Batch, "step", step)
        return self
