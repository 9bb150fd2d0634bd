"""What a device says about itself over SSH is checked here before anything uses it: its Python version, machine
and system names reach generated files (a bundle's Dockerfile, install.sh, wheel tags) and its paths reach remote
commands, so each must match a strict pattern; free text (a CPU's or a board's name) must be one line."""

from __future__ import annotations

import math
import re
from typing import Any

from edgepack.core.fileio import one_line_problem
from edgepack.measure.hardware import DeviceInfo

PYTHON_VERSION = re.compile(r"\d+\.\d+(\.\d+)?")
# x86_64, aarch64, arm64, armv7l; Linux, macOS, Darwin
MACHINE_NAME = re.compile(r"[A-Za-z0-9_]{1,32}")
SYSTEM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
PACKAGE_VERSION = re.compile(r"[0-9][0-9A-Za-z.+!_-]{0,63}")
# an absolute path with no space, quote or other character a remote shell would read
REMOTE_PATH = re.compile(r"/[A-Za-z0-9._/+@-]{0,1023}")

_KINDS: dict[str, tuple[re.Pattern[str], str]] = {
    "python version": (PYTHON_VERSION, "a Python version such as 3.11"),
    "machine": (MACHINE_NAME, "a machine name such as aarch64 or x86_64"),
    "system": (SYSTEM_NAME, "a system name such as Linux"),
    "package version": (PACKAGE_VERSION, "a version such as 0.1.0"),
    "path": (REMOTE_PATH, "an absolute path of letters, digits and . _ / + @ -"),
}


def value_problem(kind: str, value: Any) -> str | None:
    """Why `value` is not a `kind` (a key of _KINDS) a device may report; None when it is."""
    pattern, accepted = _KINDS[kind]
    if isinstance(value, str) and pattern.fullmatch(value):
        return None
    return f"is not {accepted}"


def device_info_problem(info: DeviceInfo) -> tuple[str, Any, str] | None:
    """(field, value, why) for the first field of a reported DeviceInfo that cannot be used; None when all can."""
    checks: list[tuple[str, Any, str | None]] = [
        ("os", info.os, value_problem("system", info.os)),
        ("machine", info.machine, value_problem("machine", info.machine)),
    ]
    for name in ("physical_cores", "logical_cores", "ram_total_bytes", "ram_available_bytes"):
        value = getattr(info, name)
        ok = value is None or isinstance(value, int) and not isinstance(value, bool) and value >= 0
        checks.append((name, value, None if ok else "is not a whole number"))
    texts = [("cpu_model", info.cpu_model), ("apple_chip", info.apple_chip), ("board", info.board),
             ("jetson_model", info.jetson_model), ("l4t_release", info.l4t_release), ("jetpack", info.jetpack),
             ("power_mode", info.power_mode), *(("isa_features", f) for f in info.isa_features),
             *(("notes", note) for note in info.notes), *(("cuda_gpus.name", gpu.name) for gpu in info.cuda_gpus)]
    for name, text in texts:
        if text is not None:
            checks.append((name, text, "is not text" if not isinstance(text, str) else one_line_problem(text)))
    return next(((name, value, why) for name, value, why in checks if why), None)


def bandwidth_problem(value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return None
    return "is not a positive number"
