"""Faults injected on purpose, as module-level functions a child process can import by name."""

from __future__ import annotations

import os
import signal
import time


def double(value: int) -> int:
    return 2 * value


def abort() -> None:
    os.abort()


def illegal_instruction() -> None:
    os.kill(os.getpid(), signal.SIGILL)


def killed() -> None:  # what the out-of-memory killer does
    os.kill(os.getpid(), signal.SIGKILL)


def bad_value() -> None:
    raise ValueError("temperature must be >= 0")


def hang() -> None:  # a deadlock inside a native library looks like this from outside
    time.sleep(600)
