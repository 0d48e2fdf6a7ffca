"""Write-then-rename, so a crash never leaves a file that a later run would trust.

The temporary file lives beside its destination (same file system, so the rename is atomic) under
a name no reader looks for (`.<name>.<random>.tmp`). It is synced to disk before the rename, and
the folder after it, so a power cut leaves either the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from .errors import PawError

TMP_SUFFIX = ".tmp"
T = TypeVar("T")


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any thread writes files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_path(path: Path, directory: bool = False) -> None:
    if os.name == "nt" and directory:
        return  # Windows cannot open a folder to sync it; NTFS journals the rename itself
    fd = os.open(path, os.O_RDONLY if os.name != "nt" else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder), directory=True)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside dest; on success it replaces dest, on any error it is removed.
    The new file gets the usual permissions (0666 less the umask), not mkstemp's private 0600."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=TMP_SUFFIX, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        _fsync_path(tmp_path)
        os.replace(tmp_path, dest)
        _fsync_path(dest.parent, directory=True)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def created_folder(path: Path) -> Iterator[Path]:
    """Create the folder (and its parents) for the block; if the block fails and the folder was made
    here and is still empty, it is removed again."""
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if made:
            with contextlib.suppress(OSError):  # not empty, or already gone: leave it
                path.rmdir()
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Like atomic_path for a folder: built beside dest, renamed into place when complete. An old
    dest is first renamed aside (then deleted), so no moment exists where a half-deleted or
    half-written folder sits at dest."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=TMP_SUFFIX, dir=dest.parent))
    old: Path | None = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        for folder, _, files in os.walk(tmp):  # writers that go through mkstemp leave 0600 files
            for name in files:
                os.chmod(Path(folder) / name, 0o666 & ~_UMASK)
        _sync_tree(tmp)
        if dest.is_dir() and not dest.is_symlink():
            old = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.old{TMP_SUFFIX}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        _fsync_path(dest.parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            os.replace(old, dest)  # put the previous folder back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_writable(dest: str | os.PathLike[str], option: str, folder: bool = False, into: bool = False) -> None:
    """Refuse, before any work is done, an output path the final atomic write would fail on: a
    folder where a file goes (or the reverse), a file where a parent folder must be, or a folder
    this process cannot write in (probed by creating a temporary file there, which also covers
    read-only mounts and ACLs that permission bits do not show). `folder`: dest is a folder that
    replaces any old one; `into`: dest is a folder that files are written into."""
    dest = Path(dest)
    if (folder or into) and dest.exists() and not dest.is_dir():
        raise PawError(f"{option} {dest} is a file; give the path of a folder")
    if not (folder or into) and dest.is_dir():
        raise PawError(f"{option} {dest} is a folder; give the path of a file to write")
    # The nearest existing folder the write lands in: it creates the missing ones below it.
    parent = dest if into else dest.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PawError(f"{option} {dest}: {parent} is a file, not a folder; pick another location")
    try:
        fd, probe = tempfile.mkstemp(prefix=".paw-lite-probe.", suffix=TMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise PawError(f"{option} {dest}: cannot write in {parent} ({exc.strerror}); "
                       f"pick another location or fix its permissions") from None
    os.close(fd)
    os.unlink(probe)


def checked_or_removed(path: str | os.PathLike[str], check: Callable[[], T]) -> T:
    """`check()` of a file just written; a file that fails it is removed (the error says so), so no
    later run finds and trusts it."""
    try:
        return check()
    except PawError as exc:
        Path(path).unlink(missing_ok=True)
        raise type(exc)(f"{exc} (the output {path} was removed)") from exc


def remove_stale_temporaries(directory: str | os.PathLike[str], older_than_s: float = 3600.0, prefix: str = ".") -> int:
    """Delete the leftovers of writers that were killed (`<prefix>*.tmp` files and folders older
    than `older_than_s`, so a writer still at work keeps its file). Returns how many were removed."""
    directory = Path(directory)
    cutoff = time.time() - older_than_s
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.startswith(prefix) and entry.name.endswith(TMP_SUFFIX)):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:
            continue  # another process got there first, or it is not ours to remove
    return removed
