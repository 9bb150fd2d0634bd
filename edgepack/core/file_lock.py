"""A lock on a file that one process at a time holds (flock). The kernel drops it when its holder exits, however it
exits, so a killed build never leaves it held, and whatever it left under the lock's protection can be recognised
as abandoned by whoever holds the lock next."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing, never deleted: deleting a lock file lets two holders
    lock two different files) for the block; `on_wait` is called once if another process holds it now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # read-only: another user who can read it can lock it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


SCRATCH_GRACE_S = 60.0  # a scratch directory this new may belong to a process that has not locked it yet


@contextlib.contextmanager
def held_scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new directory under `parent` that this process holds a lock on while it works there; removed after."""
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(work, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(fd)


def remove_abandoned_scratch_dirs(parent: Path, prefix: str) -> None:
    """Remove the scratch directories (from held_scratch_dir) whose process is gone: nobody holds their lock. This
    works across processes that cannot see each other's ids (containers sharing a cache)."""
    if not parent.is_dir():
        return
    for work in parent.glob(f"{prefix}*"):
        try:
            if not work.is_dir() or time.time() - work.stat().st_mtime < SCRATCH_GRACE_S:
                continue
            fd = os.open(work, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # alive
        else:
            shutil.rmtree(work, ignore_errors=True)
        finally:
            os.close(fd)
