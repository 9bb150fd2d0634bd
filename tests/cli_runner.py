"""`edgepack` as a user runs it: a fresh process, its exit code, stdout and stderr; and a server started as its
own process, waited for until its model has loaded."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request


def run_edgepack(args: list[str], env: dict[str, str] | None = None, check: bool = False,
                 timeout: int = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"edgepack {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    """Poll `url`/health until it answers 200 (503 means still loading). Fails with the server's reason when the
    model failed to load (any other status) or the process exited, and after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:  # before OSError, which it is too
            if exc.code != 503:
                raise AssertionError(f"/health answered {exc.code}: {exc.read().decode(errors='replace')}") from None
        except OSError:
            pass  # not listening yet
        if server.poll() is not None:
            stderr = server.stderr.read().decode(errors="replace") if server.stderr else ""
            raise AssertionError(f"the server exited with status {server.returncode}: {stderr[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the server did not become healthy within {timeout:g} s")
        time.sleep(0.2)
