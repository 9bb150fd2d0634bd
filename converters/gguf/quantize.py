"""F16/F32 GGUF -> quantized GGUF through llama.cpp's own quantizer (llama-cpp-python's bindings)."""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import atomic_output_file, refuse_existing
from edgepack.core.gguf_file import copy_with_metadata
from edgepack.core.versions import package_version
from runtimes.llamacpp import quiet_native_stderr

_FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"


def quant_types() -> dict[str, int]:
    """Every quantization type this llama.cpp build offers, by lower-case name (q8_0, q4_k_m, ...)."""
    import llama_cpp

    return {name[len(_FTYPE_PREFIX):].lower(): int(getattr(llama_cpp, name))
            for name in dir(llama_cpp) if name.startswith(_FTYPE_PREFIX)}


def quantizer_name() -> str:
    return f"llama.cpp llama_model_quantize (llama-cpp-python {package_version('llama-cpp-python')})"


def quantize_gguf(src: Path, dst: Path, quant_type: str, *, force: bool = False, threads: int | None = None) -> None:
    """Quantize `src` into `dst`; the output records the quantizer and the type in its metadata."""
    import llama_cpp

    types = quant_types()
    key = quant_type.lower()
    if key not in types:
        raise EdgepackError(f"unknown llama.cpp quantization type {quant_type!r}; accepted: {', '.join(sorted(types))}")
    refuse_existing(dst, force)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[key]
    params.nthread = threads or (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize.") as scratch:
        raw = Path(scratch) / "raw.gguf"
        with quiet_native_stderr():  # llama.cpp prints a line per tensor; we summarise the types instead
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(raw).encode(), ctypes.byref(params))
        if status != 0 or not raw.is_file():
            raise EdgepackError(f"llama.cpp failed to quantize {src} to {quant_type} (status {status})")
        with atomic_output_file(dst) as tmp:
            copy_with_metadata(raw, tmp, {"edgepack.quantizer": quantizer_name(),
                                          "edgepack.quant_type": key.upper()})
