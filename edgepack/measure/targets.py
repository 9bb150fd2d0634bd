"""Target device profiles: profiles/*.toml (one per device), a user's own `--profile FILE`, and `host`
(built from detecting this machine)."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from converters.registry import formats, usable_converters
from edgepack.core.cpu import INT8_ISAS
from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import one_line_problem, safe_name_problem
from edgepack.measure.hardware import DeviceInfo, detect
from runtimes.registry import runtime_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"  # beside the edgepack package, here and in the wheel
ARCHES = ("aarch64", "arm64", "x86_64")
SYSTEMS = ("linux", "macos", "windows")
ACCELERATORS = ("none", "cuda", "metal", "jetson-gpu")
HOST_HEADROOM_GIB = 1.0
# in steps, so that a repeated build on this machine sees the same budget while its free memory wobbles
BUDGET_STEP_GIB = 0.25


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    arch: str
    os: str
    accelerator: str
    cpu_cores: int
    memory_total_gib: float
    memory_budget_gib: float
    memory_budget_reason: str
    memory_bandwidth_gbps: float | None  # None: not known until measured (the host before profiling)
    formats: tuple[str, ...]
    engines: tuple[str, ...]
    python_platform: str
    python_version: str
    int8_isa: str | None
    notes: str = ""
    source: str = ""  # the file it came from, or "detected"


_TYPES: dict[str, Any] = {"name": str, "description": str, "arch": str, "os": str, "accelerator": str,
                          "cpu_cores": int, "memory_total_gib": (int, float), "memory_budget_gib": (int, float),
                          "memory_budget_reason": str, "memory_bandwidth_gbps": (int, float), "formats": list,
                          "engines": list, "python_platform": str, "python_version": str, "int8_isa": str,
                          "notes": str}
_OPTIONAL = {"notes", "int8_isa"}
_CHOICES = {"arch": ARCHES, "os": SYSTEMS, "accelerator": ACCELERATORS, "int8_isa": INT8_ISAS}


def parse_profile(data: dict[str, Any], source: str) -> TargetProfile:
    """Validate one profile's table; every error names the file and the field."""

    def fail(field_name: str, problem: str) -> EdgepackError:
        return EdgepackError(f"profile {source}: field '{field_name}' {problem}")

    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise fail(unknown[0], f"is not a profile field; known fields: {', '.join(_TYPES)}")
    for name, kind in _TYPES.items():
        if name not in data:
            if name in _OPTIONAL:
                continue
            raise fail(name, "is missing")
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "a number"
            raise fail(name, f"must be {expected}, got {value!r}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise fail(name, f"is {value!r}; accepted: {', '.join(_CHOICES[name])}")
    for name, allowed in (("formats", formats()), ("engines", runtime_names())):
        bad = [item for item in data[name] if item not in allowed]
        if bad or not data[name]:
            raise fail(name, f"must list some of {', '.join(allowed)}, got {data[name]!r}")
    for name in ("cpu_cores", "memory_total_gib", "memory_budget_gib", "memory_bandwidth_gbps"):
        if data[name] <= 0:
            raise fail(name, f"must be positive, got {data[name]}")
    problems = {"name": safe_name_problem(data["name"])}
    problems.update({name: one_line_problem(data.get(name, "")) for name in
                     ("description", "memory_budget_reason", "python_platform", "notes")})
    for name, problem in problems.items():
        if problem:
            raise fail(name, f"({data[name]!r}) {problem}")
    if not re.fullmatch(r"3\.\d{1,2}", data["python_version"]):
        raise fail("python_version", f"must be a Python version such as 3.11, got {data['python_version']!r}")
    if data["memory_budget_gib"] > data["memory_total_gib"]:
        raise fail("memory_budget_gib", f"({data['memory_budget_gib']}) is larger than memory_total_gib "
                                        f"({data['memory_total_gib']})")
    values = {f.name: data.get(f.name) for f in fields(TargetProfile) if f.name in _TYPES}
    values["formats"], values["engines"] = tuple(data["formats"]), tuple(data["engines"])
    values["notes"] = data.get("notes", "")
    for name in ("memory_total_gib", "memory_budget_gib", "memory_bandwidth_gbps"):
        values[name] = float(values[name])
    return TargetProfile(**values, source=source)


def load_profile(path: Path) -> TargetProfile:
    path = Path(path)
    if not path.is_file():
        raise EdgepackError(f"profile {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise EdgepackError(f"profile {path} is not valid TOML: {exc}") from exc
    return parse_profile(data, str(path))


def shipped_profiles() -> list[TargetProfile]:
    return [load_profile(path) for path in sorted(PROFILES_DIR.glob("*.toml"))]


def _wheel_platform(device: DeviceInfo) -> str:
    if device.os == "macOS":
        return "macosx_11_0_arm64" if device.machine == "arm64" else "macosx_10_9_x86_64"
    return f"manylinux2014_{device.machine}"


def host_profile(device: DeviceInfo | None = None) -> TargetProfile:
    """This machine as a target: its detected memory, less a headroom, is the budget."""
    device = device or detect()
    total = (device.ram_total_bytes or 0) / 2**30
    available = (device.ram_available_bytes or device.ram_total_bytes or 0) / 2**30
    accelerator = "metal" if device.metal else "jetson-gpu" if device.jetson_gpu_usable else \
        "cuda" if device.cuda_gpus else "none"
    if device.cuda_gpus:
        total = device.cuda_gpus[0].memory_bytes / 2**30
        available = total - 1.5
    return TargetProfile(
        name="host", description=f"this machine: {device.cpu_model or 'unknown CPU'}"
        + (f", {device.cuda_gpus[0].name}" if device.cuda_gpus else "") + (f", {device.board}" if device.board else ""),
        arch="arm64" if device.machine == "arm64" else device.machine,
        os={"macOS": "macos"}.get(device.os, device.os.lower()), accelerator=accelerator,
        cpu_cores=device.physical_cores or 1, memory_total_gib=round(total, 2),
        memory_budget_gib=math.floor(max(0.0, available - HOST_HEADROOM_GIB) / BUDGET_STEP_GIB) * BUDGET_STEP_GIB,
        memory_budget_reason=f"memory available now less {HOST_HEADROOM_GIB:g} GiB headroom, rounded down to "
                             f"{BUDGET_STEP_GIB:g} GiB",
        memory_bandwidth_gbps=None, formats=formats(),
        engines=tuple(engine for converter in usable_converters() for engine in converter.engines),
        python_platform=_wheel_platform(device), python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        int8_isa=device.int8_isa, notes="memory bandwidth is measured by the profiler", source="detected")


def all_targets() -> list[TargetProfile]:
    return [*shipped_profiles(), host_profile()]


def resolve_target(name: str | None = None, profile_file: Path | None = None) -> TargetProfile:
    """A shipped profile or `host` by name, or `--profile FILE` (not both)."""
    if name is not None and profile_file is not None:
        raise EdgepackError("give --target or --profile, not both")
    if profile_file is not None:
        return load_profile(profile_file)
    if name in (None, "host"):
        return host_profile()
    for profile in shipped_profiles():
        if profile.name == name:
            return profile
    names = ", ".join([p.name for p in shipped_profiles()] + ["host"])
    raise EdgepackError(f"unknown target {name!r}; known targets: {names} (or pass --profile FILE)")
