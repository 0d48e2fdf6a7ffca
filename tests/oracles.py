"""The one import policy for test oracles, and the rule that a skipped test fails under CI.

Oracle packages (torch, transformers, peft, llama_cpp, programasweights, ...) are the independent
implementations paw_lite is checked against; the `[all]` install brings every one of them. Tests get
them through `oracle()` only, at a module's top or where they are used:

    torch = oracle("torch")
    oracle("transformers", "peft")   # declared here, then imported inside the tests as usual
    PeftModel = oracle("peft").PeftModel

Locally, a missing oracle skips the module or test with the command that installs it. Under CI (the `CI`
environment variable, which .ci/run exports), with `PAW_LITE_NO_SKIPS=1` or with `--no-skips`, any
skipped test fails the run instead: a broken install step cannot leave the run green by skipping
what it could not import. pyproject.toml's `addopts` lists every skip and its reason (`-rfEs`).

Registered as a plugin by tests/conftest.py (`pytest_plugins`). tests/test_no_skips.py proves the
rule on small test files run in a subprocess, and fails on an oracle imported another way
(`pytest.importorskip`, or a plain import without a module-level `oracle()` naming the package).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir -e ".[all]"'
FLAG_ENV = "PAW_LITE_NO_SKIPS"
_OFF = ("", "0", "false", "no", "off")


def oracle(*names: str) -> ModuleType:
    """Import the oracle packages `names` and return the last one; a missing one skips the calling
    module or test (a failure under the no-skips rule). Only ImportError counts as missing: a
    package that is installed but broken (a llama.cpp library that does not load) raises."""
    module = None
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            pytest.skip(f"oracle {name} is not importable ({exc}); the test install brings it: {INSTALL}",
                        allow_module_level=True)
    assert module is not None, "oracle() needs at least one package name"
    return module


def _on(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in _OFF


def no_skips_reason(config: pytest.Config) -> str | None:
    """Why skips fail this run (the option or variable that says so), or None when they may skip."""
    if config.getoption("no_skips", False):
        return "--no-skips"
    for name in (FLAG_ENV, "CI"):
        if _on(os.environ.get(name)):
            return f"{name}={os.environ[name]}"
    return None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-skips", dest="no_skips", action="store_true",
                     help=f"a skipped test fails the run (also under CI=1 or {FLAG_ENV}=1)")


def pytest_configure(config: pytest.Config) -> None:
    reason = no_skips_reason(config)
    if reason:
        config.pluginmanager.register(_SkipsFailTheRun(reason), "paw-lite-no-skips")


class _SkipsFailTheRun:
    """Every skip stays listed as a skip with its reason (-rs), and the run fails. One rule for every
    kind of skip: an oracle() in a test or at a module's top, a skipif mark, a pytest.skip in a fixture."""

    def __init__(self, reason: str):
        self.reason = reason
        self.skipped: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # xfail reports are "skipped" too; they carry `wasxfail` and are not skips
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skipped.append(report.nodeid)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a module-level skip
            self.skipped.append(report.nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.skipped and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: printed after the list of the skips' reasons
    def pytest_terminal_summary(self, terminalreporter):
        yield
        if self.skipped:
            more = " ..." if len(self.skipped) > 10 else ""
            terminalreporter.write_line(
                f"FAILED: {len(self.skipped)} skipped, and skips fail this run ({self.reason}; without it they may "
                f"skip): {', '.join(self.skipped[:10])}{more}. Their reasons are listed above; an oracle that is "
                f"not importable means the test install is incomplete: {INSTALL}", red=True, bold=True)
