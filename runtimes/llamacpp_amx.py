"""Loading llama.cpp safely on CPUs with Intel AMX.

llama-cpp-python compiles llama.cpp with -march=native. On AMX CPUs (Sapphire Rapids and later) ggml then puts
quantized weights in its AMX "extra buffer type", whose matrix multiply raises SIGILL in ggml's worker threads
(the tile permission is requested on the main thread only; upstream llama.cpp PR #26954, still open). Loading
with `llama_model_params.use_extra_bufts = false` keeps the weights in plain CPU buffers: the same results at
the same decode speed (measured on such a CPU, within 3%). We choose at load time rather than with build flags,
so any llama-cpp-python build works, including one compiled on the device by a bundle's install.sh.

EDGEPACK_LLAMACPP_EXTRA_BUFFERS=on|off overrides the choice (on: trust a llama.cpp that has the fix).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from edgepack.core.cpu import cpu_flags

AMX_CPU_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
OVERRIDE_ENV = "EDGEPACK_LLAMACPP_EXTRA_BUFFERS"

_params_lock = threading.Lock()


def extra_buffers_allowed(flags: set[str] | frozenset[str], override: str | None = None) -> bool:
    """Whether llama.cpp may use its extra (repacked, AMX) buffer types on a CPU with these flags."""
    if override:
        setting = override.strip().lower()
        if setting in ("on", "1", "true", "yes"):
            return True
        if setting in ("off", "0", "false", "no"):
            return False
        raise ValueError(f"{OVERRIDE_ENV}={override!r}; accepted: on, off")
    return not (flags & AMX_CPU_FLAGS)


def use_extra_buffers_here() -> bool:
    return extra_buffers_allowed(cpu_flags(), os.environ.get(OVERRIDE_ENV))


@contextlib.contextmanager
def _default_model_params(use_extra_bufts: bool) -> Iterator[None]:
    """llama_cpp.Llama builds its model parameters from llama_model_default_params() and exposes no
    use_extra_bufts argument, so the default is changed for the duration of one load."""
    import llama_cpp.llama_cpp as native

    original = native.llama_model_default_params
    if use_extra_bufts or "use_extra_bufts" not in dict(native.llama_model_params._fields_):
        yield
        return

    def without_extra_buffers():
        params = original()
        params.use_extra_bufts = False
        return params

    with _params_lock:
        native.llama_model_default_params = without_extra_buffers
        try:
            yield
        finally:
            native.llama_model_default_params = original


def safe_model_loading() -> contextlib.AbstractContextManager[None]:
    """While this is entered, models that llama-cpp-python loads (by any code, e.g. its own server) keep their
    weights out of the extra buffer types on AMX CPUs."""
    return _default_model_params(use_extra_buffers_here())


def load_llama(model_path: str | os.PathLike[str], **kwargs):
    """llama_cpp.Llama(model_path, **kwargs), with the extra buffer types off on AMX CPUs."""
    from llama_cpp import Llama

    with safe_model_loading():
        return Llama(model_path=str(model_path), **kwargs)
