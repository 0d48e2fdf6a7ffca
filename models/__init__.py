"""The models manifest (manifest.json), installed as paw_lite.models; weights are never kept here."""
