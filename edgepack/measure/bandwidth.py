"""A short, honest memory-bandwidth micro-benchmark: every thread reads its own large buffer (a max over it, which
numpy vectorizes so that memory, not arithmetic, is the limit), best of a few rounds. It counts bytes read only, as
decoding a token does: it reads every weight and writes almost nothing. The same kernel runs here and on a device
measured over SSH, so both sides of a prediction rest on the same method. It measures what a machine achieves,
not its data-sheet figure."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# 256 MiB a thread: several times the last-level cache of the CPUs we target, so the buffer comes from DRAM
DEFAULT_MIB_PER_THREAD = 256


def measure_bandwidth_gbps(threads: int, mib_per_thread: int = DEFAULT_MIB_PER_THREAD, rounds: int = 5) -> float:
    """GB/s (1e9 bytes/s) read by `threads` concurrent reductions. numpy releases the GIL while reducing, so the
    threads really run in parallel."""
    count = mib_per_thread * 2**20 // 8
    buffers = [np.ones(count, dtype=np.float64) for _ in range(threads)]

    def read(index: int) -> None:
        buffers[index].max()

    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(read, range(threads)))  # first touch out of the timing
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(read, range(threads)))
            best = min(best, time.perf_counter() - start)
    return threads * count * 8 / best / 1e9
