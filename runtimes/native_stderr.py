"""llama.cpp writes some of what it has to say straight to file descriptor 2 (load-time notes, a grammar it cannot
parse printed whole): these hide it, or keep it back for the caller to summarise."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

# File descriptor 2 is redirected by one thread at a time: two overlapping redirections would restore it in the
# wrong order and leave stderr pointing at a closed or deleted file
_native_stderr_lock = threading.Lock()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """llama.cpp prints some load-time notes straight to file descriptor 2, past verbose=False; hide them."""
    with _native_stderr_lock:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(io.StringIO()):
                os.dup2(devnull.fileno(), 2)  # C-level writes
                yield  # Python-level writes (llama-cpp-python's log callback) go to the StringIO
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[list[str]]:
    """What is written to file descriptor 2 meanwhile (llama.cpp's fprintf, and its log callback's lines, which go to
    Python's stderr) is kept back instead of shown: the list given gets it as text on leaving."""
    captured: list[str] = []
    with _native_stderr_lock, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", errors="replace"))
