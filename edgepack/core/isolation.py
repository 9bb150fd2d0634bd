"""Running a native engine where its crash cannot take the caller down.

llama.cpp and ONNX Runtime are native code: an illegal instruction, an abort in an assertion, a segfault or the
out-of-memory killer ends the whole process, not just the call. `call_isolated` runs one function in a child
process; a Python exception there is raised here as it was, and a crash becomes an EngineCrashedError that names
the signal and says what to do, so a build can reject that variant and go on with the others.

Children are forked from a forkserver that has already imported the heavy libraries (so a call costs a fork, not
an interpreter start), or spawned where there is no forkserver (Windows).
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
from collections.abc import Callable
from typing import Any

from edgepack.core.errors import EdgepackError, EngineCrashedError

# imported once in the forkserver, so each child starts with them loaded; absent ones are skipped
PRELOAD = ("numpy", "torch", "transformers", "onnxruntime", "llama_cpp")

HINTS = {
    "SIGILL": "the engine's native build uses CPU instructions this machine cannot run (llama-cpp-python compiles "
              "for the CPU it was built on: rebuild it here; on Intel AMX CPUs see the README)",
    "SIGKILL": "killed from outside, most often by the out-of-memory killer: the variant needs more memory than is "
               "free (close other programs, or leave this variant out)",
    "SIGABRT": "the engine aborted on a failed check inside its native library; `edgepack run` on this variant "
               "shows its own message",
    "SIGSEGV": "a memory fault inside the engine's native library (a corrupt file, or a bug in that build); "
               "`edgepack doctor` checks the engines on a known-good model",
    "SIGBUS": "the model file changed or shrank while it was mapped into memory",
    "SIGFPE": "an arithmetic fault inside the engine's native library",
}

_context: Any = None


def _multiprocessing_context():
    global _context
    if _context is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload([name for name in PRELOAD if _importable(name)])
        else:
            _context = multiprocessing.get_context("spawn")
    return _context


def start_isolation() -> None:
    """Start the forkserver now, so that its imports overlap whatever the caller does before its first call."""
    context = _multiprocessing_context()
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def describe_exit(exitcode: int | None) -> tuple[str, str]:
    """(what ended the child, what to do about it) for a child that died without answering."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}", "the engine's native library was stopped by a signal"
        return f"{name} ({signal.strsignal(-exitcode) or name})", HINTS.get(name, "the engine's native library "
                                                                                   "was stopped by this signal")
    return f"exit status {exitcode}", "the engine's native library ended the process without a Python error"


def _child(connection, function: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        outcome: tuple[bool, Any] = (True, function(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 (everything goes back to the parent, which raises it)
        try:
            pickle.dumps(exc)
            outcome = (False, exc)
        except Exception:  # noqa: BLE001
            outcome = (False, EdgepackError(f"{type(exc).__name__}: {exc}"))
    connection.send(outcome)
    connection.close()


def call_isolated(what: str, function: Callable[..., Any], *args: Any, timeout_s: float | None = None,
                  **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` in a child process. `what` names the work in the crash message (e.g. "scoring
    gguf-q8_0"). `function` must be importable by name (a module-level function) and its arguments picklable.
    With `timeout_s`, a child that has not answered by then (a hung engine) is killed and that is the error."""
    context = _multiprocessing_context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, function, args, kwargs), daemon=True)
    process.start()
    sender.close()
    try:
        if timeout_s is not None and not receiver.poll(timeout_s):
            process.kill()
            process.join()
            raise EngineCrashedError(f"{what}: the engine did not finish within {timeout_s:g} s and was stopped; "
                                     "it may be stuck (run `edgepack doctor`), or this machine is too slow for it",
                                     cause="timeout")
        ok, value = receiver.recv()
    except EOFError:  # the child died before it answered
        process.join()
        cause, hint = describe_exit(process.exitcode)
        raise EngineCrashedError(f"{what}: the engine crashed with {cause}; {hint}", cause=cause) from None
    finally:
        receiver.close()
    process.join()
    if ok:
        return value
    raise value
