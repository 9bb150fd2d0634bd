"""Bounded admission: a request holds a slot from before its prompt is tokenized until its answer is done (or its
client has gone); past the bound the answer is 503 with Retry-After, before any work is spent on it.

The server keeps two bounds: local generations (the one running plus the queue) and upstream calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgepack.core.errors import ApiError


@dataclass
class Slots:
    limit: int
    busy_message: Callable[[int], str]  # in_use -> the 503's message
    code: str
    retry_after_s: int
    on_full: Callable[[], None] = lambda: None
    in_use: int = 0

    def take(self) -> Slot:
        if self.in_use >= self.limit:
            self.on_full()
            raise ApiError(503, self.busy_message(self.in_use), "server_error", code=self.code,
                           headers={"Retry-After": str(self.retry_after_s)})
        self.in_use += 1
        return Slot(self)


class Slot:
    """One admitted request's place. `with slots.take() as slot:` releases it on leaving, unless `keep()` handed it
    to a streaming response, which releases it when the stream ends."""

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self._released = False
        self._kept = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slots.in_use -= 1

    def keep(self) -> Slot:
        self._kept = True
        return self

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._kept:
            self.release()
