"""`edgepack doctor`: can this machine run the default build? Each engine loads and generates from a tiny
built-in student in a child process (so a crash is a finding, not the end of the check), and the libraries,
CPU features, GPU offload, free memory and free disk are read and judged, each failure with what to do.
"""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgepack.core.cache import cache_root
from edgepack.core.errors import EdgepackError
from edgepack.core.isolation import call_isolated, start_isolation
from edgepack.core.versions import package_version

Status = Literal["ok", "warn", "fail"]
# what the default build of the demo student needs, measured with a fresh cache on a 2-core x86 machine: the cache
# holds 2.0 GB and the bundle 266 MB afterwards; the build's largest process peaked at 3.6 GiB resident
NEEDED_DISK_GIB = 4.0
NEEDED_MEMORY_GIB = 4.0
PROBE_KINDS = ("gguf-q8_0", "gguf-q4_k_m", "onnx-fp32")  # the quantized GGUFs are the ones AMX CPUs crashed on
GENERATE_TIMEOUT_S = 300  # loading a tiny model and generating 8 tokens takes seconds; past this it is stuck


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""  # what to do when it is not ok


@dataclass(frozen=True)
class DoctorOptions:
    run_engines: bool = True  # convert the tiny student and generate from it on every engine
    needed_disk_gib: float = NEEDED_DISK_GIB
    needed_memory_gib: float = NEEDED_MEMORY_GIB


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def healthy(self) -> bool:
        """Everything the default build needs works (warnings allowed)."""
        return all(check.status != "fail" for check in self.checks)


def doctor(options: DoctorOptions | None = None) -> DoctorReport:
    options = options or DoctorOptions()
    checks = [_python(), _library("torch", "torch"), _llama_cpp(), _onnxruntime(), _memory(options),
              _disk(options)]
    if options.run_engines:
        checks += _engines()
    return DoctorReport(tuple(checks))


def require_healthy(report: DoctorReport) -> None:
    if not report.healthy:
        failed = ", ".join(check.name for check in report.checks if check.status == "fail")
        raise EdgepackError(f"this machine cannot run the default build yet: {failed} (see the fixes above)")


def _python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    return Check("python", "ok", f"Python {version} on {platform.system()} {platform.machine()}")


def _library(name: str, module: str) -> Check:
    try:
        __import__(module)
    except ImportError as exc:
        return Check(name, "fail", f"cannot import {module}: {exc}",
                     "pip install torch==2.13.0 first (a CPU build), then pip install -e ." if name == "torch"
                     else f"pip install {name}")
    return Check(name, "ok", f"{name} {package_version(name)}")


def _llama_cpp() -> Check:
    try:
        import llama_cpp
    except ImportError as exc:
        return Check("llama.cpp build", "fail", f"cannot import llama_cpp: {exc}",
                     "pip install llama-cpp-python (it compiles llama.cpp: needs a C/C++ compiler and CMake)")
    from edgepack.core.cpu import cpu_flags
    from runtimes.llamacpp_amx import extra_buffers_allowed

    # "CPU : SSE3 = 1 | AVX2 = 1 | ..." (one such group per backend)
    features = llama_cpp.llama_print_system_info().decode(errors="replace")
    enabled = [part.split("=")[0].split(":")[-1].strip() for part in features.split("|")
               if part.strip().endswith("= 1")]
    gpu = "GPU offload available" if llama_cpp.llama_supports_gpu_offload() else \
        "no GPU offload (a CPU build; CMAKE_ARGS=-DGGML_CUDA=on or -DGGML_METAL=on builds one for a GPU)"
    amx = "" if extra_buffers_allowed(cpu_flags()) else \
        "; AMX CPU: GGUF loads with llama.cpp's extra buffer types off (README: Intel CPUs with AMX)"
    return Check("llama.cpp build", "ok",
                 f"llama-cpp-python {package_version('llama-cpp-python')}, CPU features "
                 f"{' '.join(enabled) or 'none reported'}; {gpu}{amx}")


def _onnxruntime() -> Check:
    try:
        import onnxruntime
    except ImportError as exc:
        return Check("onnxruntime", "fail", f"cannot import onnxruntime: {exc}", "pip install onnxruntime")
    return Check("onnxruntime", "ok", f"onnxruntime {package_version('onnxruntime')}, providers "
                                      f"{', '.join(onnxruntime.get_available_providers())}")


def _memory(options: DoctorOptions) -> Check:
    import psutil

    available = psutil.virtual_memory().available / 2**30
    detail = f"{available:.1f} GiB of memory available (the default build of the demo student needs about " \
             f"{options.needed_memory_gib:g} GiB)"
    if available < options.needed_memory_gib:
        return Check("memory", "fail", detail, "close other programs, or build only GGUF: --formats gguf")
    return Check("memory", "ok", detail)


def _disk(options: DoctorOptions) -> Check:
    root = cache_root()
    existing = next(parent for parent in (root, *root.parents) if parent.exists())
    free = shutil.disk_usage(existing).free / 2**30
    detail = f"{free:.1f} GiB free for the cache at {root} (the default build needs about " \
             f"{options.needed_disk_gib:g} GiB)"
    if free < options.needed_disk_gib:
        return Check("disk", "fail", detail, "free space there, or point EDGEPACK_CACHE at a larger disk")
    return Check("disk", "ok", detail)


def _engines() -> list[Check]:
    """Convert the tiny student to each probe kind and generate from it, each engine in a child process."""
    from edgepack.convert import ConvertOptions, convert
    from edgepack.student.tiny import write_tiny_llama

    checks = []
    start_isolation()  # its libraries load while the tiny student is made and converted
    with tempfile.TemporaryDirectory(prefix="edgepack-doctor-") as scratch:
        model = write_tiny_llama(Path(scratch) / "tiny-llama")
        checks.append(_generate_check("torch (reference)", model))
        for kind in PROBE_KINDS:
            try:
                (variant,) = convert(model, [kind], Path(scratch) / "variants", ConvertOptions(show_progress=False))
            except Exception as exc:  # noqa: BLE001 (every failure is a finding to report)
                checks.append(Check(f"convert {kind}", "fail", f"{type(exc).__name__}: {exc}",
                                    "reinstall edgepack's dependencies (pip install -e .); `edgepack convert` on "
                                    "your model shows the full error"))
                continue
            checks.append(_generate_check(kind, variant.path))
    return checks


def _generate_check(name: str, path: Path) -> Check:
    try:
        engine, tokens = call_isolated(f"generating from {name}", generate_eight_tokens, path,
                                       timeout_s=GENERATE_TIMEOUT_S)
    except EdgepackError as exc:
        return Check(f"engine {name}", "fail", str(exc), "`edgepack run` on a variant of this kind shows the "
                                                         "engine's own message")
    return Check(f"engine {name}", "ok", f"{engine} loaded it and generated {tokens} tokens in a child process")


def generate_eight_tokens(path: Path) -> tuple[str, int]:
    """Run in a child: load `path` on the engine that runs it and generate 8 tokens."""
    from runtimes.base import GenerationOptions, LoadOptions
    from runtimes.registry import open_runtime

    runtime = open_runtime(path, LoadOptions(context_length=128))
    try:
        result = runtime.complete("The lighthouse keeper", GenerationOptions(max_tokens=8, ignore_eos=True))
        return runtime.name, result.completion_tokens
    finally:
        runtime.close()
