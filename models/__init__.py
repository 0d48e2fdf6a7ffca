"""The models manifest (manifest.json), installed as paw_lite.models; weights are never kept here."""

# Mapped to paw_lite.models by pyproject.toml; refused under its folder name for the reason
# convert/__init__.py gives (a second copy importable as a top-level `models`).
if __name__ != "paw_lite.models":
    raise ImportError(f"this folder is the package paw_lite.models; import it by that name, not as {__name__!r}")
