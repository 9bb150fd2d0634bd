"""A lock on a file that one process at a time holds (flock). The kernel drops it when its holder exits, however it
exits, so a killed build never leaves it held, and whatever it left under the lock's protection can be recognised
as abandoned by whoever holds the lock next."""

from __future__ import annotations

import contextlib
import fcntl
import os
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
