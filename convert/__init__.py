"""Converters from the published checkpoints to what paw_lite runs, installed as paw_lite.convert."""

# The folder is mapped to paw_lite.convert by pyproject.toml. `python -m pytest` (like any
# `python -m` or a script run from the checkout) puts the checkout's root first on sys.path, where
# this folder would also import as a top-level `convert`: a second copy of every module, so a test
# patching one copy would leave the other running. One name only.
if __name__ != "paw_lite.convert":
    raise ImportError(f"this folder is the package paw_lite.convert; import it by that name, not as {__name__!r}")
