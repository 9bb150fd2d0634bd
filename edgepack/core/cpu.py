"""This CPU's feature flags, read once here for everyone who needs them: hardware detection, the ONNX int8
quantizer's choice of integer kernels, and the llama.cpp engine's AMX workaround."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal, get_args

Int8Isa = Literal["avx2", "avx512-vnni", "arm64"]
INT8_ISAS: tuple[str, ...] = get_args(Int8Isa)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Raw feature flags of Linux's /proc/cpuinfo ("flags" on x86, "Features" on ARM); empty where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def int8_isa(machine: str | None = None, flags: set[str] | None = None) -> Int8Isa:
    """The integer-matmul family ONNX Runtime's int8 kernels use: arm64, avx512-vnni (or AVX-VNNI), else avx2."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    flags = cpu_flags() if flags is None else flags
    if {"avx512_vnni", "avx_vnni"} & flags:
        return "avx512-vnni"
    return "avx2"
