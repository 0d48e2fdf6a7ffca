"""The no-skips rule (tests/oracles.py): a skipped test passes locally and fails the run under CI,
`PAW_LITE_NO_SKIPS=1` or `--no-skips`, with the skip's reason shown. Proved on tiny test files run by
pytest in a subprocess, with the environment set explicitly (this test itself runs under CI=1 there)."""

from __future__ import annotations

import os
import subprocess
import sys
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

SKIPS = {
    "test_missing_oracle.py": "from oracles import oracle\n\n"
                              "def test_needs_an_oracle():\n    oracle('paw_lite_no_such_oracle')\n",
    "test_module_oracle.py": "from oracles import oracle\n\noracle('paw_lite_no_such_oracle')\n\n"
                             "def test_never_collected():\n    pass\n",
    "test_skipif.py": "import pytest\n\n@pytest.mark.skipif(True, reason='a platform this is not')\n"
                      "def test_platform():\n    pass\n",
}
PASSES = ("import pytest\n\ndef test_plain():\n    pass\n\n"
          "@pytest.mark.xfail(reason='known', strict=True)\ndef test_expected_failure():\n    assert False\n")


def run_pytest(folder: Path, env_set: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PAW_LITE_NO_SKIPS", "PYTEST_ADDOPTS")}
    # no plugin autoload: the run needs none, and each pytest starts in a fraction of the time
    env.update(env_set, PYTHONPATH=str(TESTS), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    # -p oracles: the plugin, as tests/conftest.py registers it; -rs as pyproject.toml's addopts
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "oracles", "-p", "no:cacheprovider", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def skipping(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("skipping")
    for name, text in SKIPS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_skips_pass_locally_with_their_reasons_shown(skipping):
    done = run_pytest(skipping, {})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 skipped" in done.stdout
    assert "oracle paw_lite_no_such_oracle is not importable" in done.stdout and "pip install" in done.stdout
    assert "a platform this is not" in done.stdout


@pytest.mark.parametrize("env_set, args", [({"CI": "true"}, ()), ({"PAW_LITE_NO_SKIPS": "1"}, ()),
                                           ({}, ("--no-skips",))])
def test_skips_fail_under_ci_or_the_flag(skipping, env_set, args):
    done = run_pytest(skipping, env_set, *args)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "3 skipped, and skips fail this run" in done.stdout
    for name in SKIPS:  # each one named, with its reason listed by -rs
        assert name in done.stdout.split("skips fail this run")[-1]
    assert "oracle paw_lite_no_such_oracle is not importable" in done.stdout and "a platform this is not" in done.stdout


def test_a_failure_keeps_its_exit_status_under_ci(skipping, tmp_path):
    (skipping / "test_fails.py").write_text("def test_fails():\n    assert False\n", encoding="utf-8")
    try:
        done = run_pytest(skipping, {"CI": "1"})
    finally:
        (skipping / "test_fails.py").unlink()
    assert done.returncode == 1 and "1 failed" in done.stdout and "3 skipped, and skips fail this run" in done.stdout


def test_ci_set_to_false_allows_skips(skipping):
    assert run_pytest(skipping, {"CI": "false"}).returncode == 0


def test_passing_tests_and_xfail_are_untouched_under_ci(tmp_path):
    (tmp_path / "test_fine.py").write_text(PASSES, encoding="utf-8")
    done = run_pytest(tmp_path, {"CI": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 1 xfailed" in done.stdout


def test_this_suite_uses_the_rule(pytestconfig):
    """The plugin is active here, skips are listed by the README's `python -m pytest -q`, and .ci/run
    runs under CI whatever the caller's environment."""
    assert pytestconfig.pluginmanager.hasplugin("oracles")
    addopts = re.search(r'^addopts = "([^"]*)"$', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M).group(1)
    assert any(opt.startswith("-r") and "s" in opt for opt in addopts.split())
    ci_run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'export CI="${CI:-1}"' in ci_run


ORACLES = ("torch", "transformers", "peft", "llama_cpp", "programasweights", "jsonschema", "regex", "openai")
_DIRECT_IMPORT = re.compile(r"^\s*(?:import|from)\s+(%s)\b" % "|".join(ORACLES), re.M)
_MODULE_DECLARATION = re.compile(r"^(?:[\w, ]+ = )?oracle\(([^)]*)\)", re.M)


def test_every_oracle_import_goes_through_the_policy():
    """An oracle is imported through oracle() (skips locally, fails under CI), or directly in a file
    that declared it with a module-level oracle() first: no importorskip, no try/except ImportError."""
    found = []
    for path in sorted(TESTS.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        declared = {name.split(".")[0] for m in _MODULE_DECLARATION.finditer(text)
                    for name in re.findall(r'"([\w.]+)"', m.group(1))}
        found += [f"{path.name}:{text[:m.start()].count(chr(10)) + 1}: {m.group(1)}"
                  for m in _DIRECT_IMPORT.finditer(text) if m.group(1) not in declared]
        if path.name != "test_no_skips.py":
            found += [f"{path.name}: importorskip" for _ in re.finditer(r"importorskip\(", text)]
    assert not found, found
