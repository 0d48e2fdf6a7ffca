"""convert/ and models/ are importable one way only (as paw_lite.convert and paw_lite.models), and
the benchmarks import what they share with the tests from the package, not from tests/."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder", ["convert", "models"])
def test_a_folder_mapped_into_the_package_does_not_import_under_its_own_name(folder):
    package = importlib.import_module(f"paw_lite.{folder}")
    assert Path(package.__file__).parent == ROOT / folder
    # `python -c` (like `python -m pytest`) puts the working folder first on sys.path: run from the
    # checkout's root, where the folder would otherwise import as a second, top-level copy.
    done = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert f"this folder is the package paw_lite.{folder}; import it by that name" in done.stderr
    # and in this process (pytest started with the checkout on sys.path or not): no second copy
    with pytest.raises(ImportError):
        importlib.import_module(folder)
    assert folder not in sys.modules


def test_benchmarks_do_not_reach_into_tests():
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        text = script.read_text(encoding="utf-8")
        assert "sys.path" not in text, f"{script.name} edits sys.path"
        assert '"tests"' not in text, f"{script.name} imports from tests/"


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject.toml lists the packages by hand: one left out is missing from a wheel, though an
    editable install (the tests') still finds it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "paw_lite").rglob("__init__.py")}
    found |= {"paw_lite.convert", "paw_lite.models"}  # mapped from the top-level folders
    assert found <= listed, sorted(found - listed)
