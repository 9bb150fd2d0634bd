"""A short, honest memory-bandwidth micro-benchmark: every core copies its own large buffer (reads + writes),
best of a few rounds. It measures what this machine achieves, not its data-sheet figure."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def measure_bandwidth_gbps(threads: int, mib_per_thread: int = 128, rounds: int = 5) -> float:
    """GB/s (1e9 bytes/s) of read + write traffic of `threads` concurrent copies. numpy releases the GIL while
    copying, so the threads really run in parallel."""
    count = mib_per_thread * 2**20 // 8
    sources = [np.ones(count, dtype=np.float64) for _ in range(threads)]
    targets = [np.empty_like(s) for s in sources]
    for s, t in zip(sources, targets, strict=True):
        np.copyto(t, s)  # touch every page before timing

    def copy(index: int) -> None:
        np.copyto(targets[index], sources[index])

    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(copy, range(threads)))
            best = min(best, time.perf_counter() - start)
    moved = 2 * threads * count * 8  # each byte is read once and written once
    return moved / best / 1e9
