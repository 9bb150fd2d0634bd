"""F16/F32 GGUF -> quantized GGUF through llama.cpp's own quantizer (llama-cpp-python's bindings)."""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from converters.gguf.imatrix import ImportanceMatrix
from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import atomic_output_file, refuse_existing
from edgepack.core.gguf_file import copy_with_metadata
from edgepack.core.versions import package_version
from runtimes.native_stderr import quiet_native_stderr

_FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"
# ggml's Q8_0 rounds every block to its own scale and takes no importance weights (its quantize function ignores
# them), and the float types are not rounded at all: an importance matrix changes nothing for these.
_IGNORES_IMATRIX = frozenset({"q8_0", "f16", "bf16"})


def quant_types() -> dict[str, int]:
    """Every quantization type this llama.cpp build offers, by lower-case name (q8_0, q4_k_m, ...)."""
    import llama_cpp

    return {name[len(_FTYPE_PREFIX):].lower(): int(getattr(llama_cpp, name))
            for name in dir(llama_cpp) if name.startswith(_FTYPE_PREFIX)}


def uses_imatrix(quant_type: str) -> bool:
    """Whether an importance matrix changes what llama.cpp makes of `quant_type`."""
    return quant_type.lower() not in _IGNORES_IMATRIX


def requires_imatrix(quant_type: str) -> bool:
    """The IQ types: llama.cpp's lowest-bit ones produce garbage without an importance matrix, and we hold the
    others (iq4_xs, iq3_m, ...) to the same rule, as they are made for use with one."""
    return quant_type.lower().startswith("iq")


def refuse_missing_imatrix(quant_type: str, has_imatrix: bool) -> None:
    if requires_imatrix(quant_type) and not has_imatrix:
        raise EdgepackError(f"gguf-{quant_type.lower()} needs an importance matrix, and this conversion has none "
                            "(--no-imatrix turns it off); drop --no-imatrix (edgepack computes one from the model "
                            "over a calibration text), or choose a kind that works without one, such as "
                            "gguf-q4_k_m or gguf-q5_k_m")


def quantizer_name() -> str:
    return f"llama.cpp llama_model_quantize (llama-cpp-python {package_version('llama-cpp-python')})"


def quantize_gguf(src: Path, dst: Path, quant_type: str, *, force: bool = False, threads: int | None = None,
                  imatrix: ImportanceMatrix | None = None) -> None:
    """Quantize `src` into `dst`, with each tensor's rounding weighted by `imatrix` where it has an entry; the
    output records the quantizer, the type and the importance matrix in its metadata."""
    import llama_cpp

    types = quant_types()
    key = quant_type.lower()
    if key not in types:
        raise EdgepackError(f"unknown llama.cpp quantization type {quant_type!r}; accepted: {', '.join(sorted(types))}")
    refuse_missing_imatrix(key, imatrix is not None)
    refuse_existing(dst, force)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[key]
    params.nthread = threads or (os.cpu_count() or 1)
    # referenced until this function returns, so the native memory it owns outlives llama_model_quantize
    entries = _ImatrixEntries(imatrix.importances()) if imatrix is not None else None
    if entries is not None:
        params.imatrix = ctypes.cast(entries.array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    metadata = {"edgepack.quantizer": quantizer_name(), "edgepack.quant_type": key.upper()}
    if imatrix is not None:
        metadata["edgepack.imatrix"] = imatrix.describe()
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize.") as scratch:
        raw = Path(scratch) / "raw.gguf"
        with quiet_native_stderr():  # llama.cpp prints a line per tensor; we summarise the types instead
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(raw).encode(), ctypes.byref(params))
        if status != 0 or not raw.is_file():
            raise EdgepackError(f"llama.cpp failed to quantize {src} to {quant_type} (status {status})")
        with atomic_output_file(dst) as tmp:
            copy_with_metadata(raw, tmp, metadata)


class _ImatrixEntries:
    """llama_model_quantize_params.imatrix: an array of {name, data, size} ended by a NULL name, and the name
    bytes and float arrays it points into (owned here, so they live as long as this object)."""

    def __init__(self, importances: Mapping[str, np.ndarray]) -> None:
        import llama_cpp

        self.names = [name.encode() for name in importances]
        self.arrays = [np.ascontiguousarray(values, dtype=np.float32) for values in importances.values()]
        self.array = (llama_cpp.llama_model_imatrix_data * (len(self.names) + 1))()  # zeroed: the last is NULL
        for index, (name, values) in enumerate(zip(self.names, self.arrays, strict=True)):
            entry = self.array[index]
            entry.name = name
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
