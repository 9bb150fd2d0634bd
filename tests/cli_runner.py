"""`edgepack` as a user runs it: a fresh process, its exit code, stdout and stderr."""

from __future__ import annotations

import subprocess
import sys


def run_edgepack(args: list[str], env: dict[str, str] | None = None, check: bool = False,
                 timeout: int = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"edgepack {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done
