"""Run inside Dask worker processes by tests/test_dask.py (through `client.run`), to stop a worker
at a known point: when it starts a partition's `fn.map`, it writes a marker file named after its
pid, then waits for a release file. The test kills the process while it waits, so the kill lands
mid-partition whatever the scheduling. A restarted worker is a new process, without the hold."""

from __future__ import annotations

import os
import time
from pathlib import Path

# How long a held map waits for the release file. Only a failing test gets there (it would release
# or kill in well under a second); the margin is for a machine loaded by other jobs.
HOLD_LIMIT_S = 120


def hold_maps(marker_dir: str) -> int:
    """Patch this process's PawFunction.map to mark and hold; returns the pid."""
    from paw_lite.runtime import PawFunction

    original = PawFunction.map
    folder = Path(marker_dir)

    def held(self, *args, **kwargs):
        marker = folder / f"started-{os.getpid()}"
        if not marker.exists():
            tmp = folder / f".started-{os.getpid()}.tmp"
            tmp.write_text(str(os.getpid()))
            tmp.rename(marker)  # atomic: the test never sees a half-written marker
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not (folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a file the test writes, not ordering by time
        return original(self, *args, **kwargs)

    held.original = original
    PawFunction.map = held
    return os.getpid()


def release_maps() -> None:
    from paw_lite.runtime import PawFunction

    PawFunction.map = getattr(PawFunction.map, "original", PawFunction.map)
