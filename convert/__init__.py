"""Converters from the published checkpoints to what paw_lite runs (imported as paw_lite.convert)."""
