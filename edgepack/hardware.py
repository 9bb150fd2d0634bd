"""What this machine's CPU can do, as far as the engines care (the hardware profiler builds on this)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

INT8_ISAS = ("avx2", "avx512-vnni", "arm64")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """ISA feature flags: /proc/cpuinfo on Linux, sysctl on macOS; empty when unreadable."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if path.is_file():
            cpuinfo = path.read_text(errors="replace")
        elif platform.system() == "Darwin":
            try:
                out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                return set()
            return {line.split(":")[0].rsplit(".", 1)[-1].lower() for line in out.splitlines()
                    if line.startswith("hw.optional.") and line.rstrip().endswith(": 1")}
        else:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def int8_isa(machine: str | None = None, flags: set[str] | None = None) -> str:
    """The integer-matmul family ONNX Runtime's int8 kernels will use here: arm64, avx512-vnni (or AVX-VNNI),
    else avx2."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    flags = cpu_flags() if flags is None else flags
    if {"avx512_vnni", "avx_vnni"} & flags:
        return "avx512-vnni"
    return "avx2"
