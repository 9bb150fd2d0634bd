"""Helpers shared by benchmarks: timing a command in a fresh process, with its own peak memory."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunResult:
    wall_s: float
    peak_rss_mib: float


def run_measured(command: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
                 stdout=subprocess.DEVNULL) -> RunResult:
    """Run `command` to completion; its wall time and peak RSS (from wait4, so only that process counts).

    The benchmark process itself stays small (no torch imported), since a child's peak RSS on Linux starts from
    the size of the parent it was forked from."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = stderr.decode(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed with exit {process.returncode}:\n{tail}")
    return RunResult(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024)


def median(values: list[float]) -> float:
    return statistics.median(values)


def llama_cpp_generate_timing(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """One greedy run of llama-cpp-python's own generate loop: (seconds to the first token, decode t/s after it).

    llama-cpp-python reuses the cache of a prompt it has just seen, so only a fresh prompt's first token includes
    its prefill."""
    start = time.perf_counter()
    first, count = None, 0
    for _token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        count += 1
        if first is None:
            first = time.perf_counter()
        if count == new_tokens:
            break
    return first - start, (new_tokens - 1) / (time.perf_counter() - first)


def resolve_demo_model() -> Path:
    """The demo student's folder, resolved in a child process so the benchmark itself never imports torch (a
    child's peak RSS starts from its parent's size)."""
    code = "from edgepack.student.demo import resolve_model; print(resolve_model(None))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])
