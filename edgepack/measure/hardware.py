"""Detect the device edgepack runs on: CPU and its ISA features, memory, Apple chip, Jetson, CUDA GPUs.

Every file and command is read through one seam (`SystemProbe`). `ReplayProbe` replays a probe file instead of
the machine: the tests' fixtures (tests/data/devices/), which are synthetic (written by hand from the public
documentation of each device's formats, not captured from a device), or a real capture that
`edgepack targets --dump-probe` wrote on a device through `CapturingProbe`. Each file says which it is in its
"provenance". Detection never crashes on an odd machine: what cannot be read is None, with a note.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edgepack.core.cpu import cpu_flags, int8_isa

# ISA features the engines care about, by the names Linux's /proc/cpuinfo uses (x86 "flags", ARM "Features")
X86_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "amx_int8")
ARM_FEATURES = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2",
                "asimdhp": "fp16", "bf16": "bf16"}
MACOS_ARM_FEATURES = {"hw.optional.neon": "neon", "hw.optional.arm.FEAT_DotProd": "dotprod",
                      "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.arm.FEAT_FP16": "fp16",
                      "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_SME": "sme"}
ARM_CORES = {"0xd03": "Cortex-A53", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76", "0xd42": "Cortex-A78AE",
             "0xd41": "Cortex-A78", "0xd4f": "Neoverse-V2", "0xd0c": "Neoverse-N1"}
# L4T (Jetson Linux) release -> JetPack, from NVIDIA's JetPack release notes
JETPACK_BY_L4T = {"36.4.3": "6.2", "36.4": "6.1", "36.3": "6.0", "36.2": "6.0 DP", "35.6": "5.1.4",
                  "35.5": "5.1.3", "35.4": "5.1.2", "35.3": "5.1.1", "35.2": "5.1", "35.1": "5.0.2",
                  "34.1": "5.0", "32.7": "4.6.x"}
NVIDIA_SMI_QUERY = "nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv,noheader,nounits"


class SystemProbe:
    """How detection reads the machine. Subclass or replace to read something else."""

    def system(self) -> str:
        return platform.system()

    def machine(self) -> str:
        return platform.machine()

    def read_file(self, path: str) -> str | None:
        try:
            return Path(path).read_text(errors="replace")
        except OSError:
            return None

    def exists(self, path: str) -> bool:
        return Path(path).exists()

    def run(self, command: str) -> str | None:
        try:
            done = subprocess.run(command.split(), capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None


@dataclass
class ReplayProbe(SystemProbe):
    """Replays a probe file (tests/data/devices/*.json, or a capture from `edgepack targets --dump-probe`): the
    files detection read, the `paths` it checked that exist, the commands it ran with their output, and the
    file's `provenance` (synthetic fixture or real capture). Anything not in the file reads as absent."""

    probe_system: str
    probe_machine: str
    files: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)
    provenance: str | None = None

    @classmethod
    def load(cls, path: Path) -> ReplayProbe:
        return cls.from_json(json.loads(Path(path).read_text()))

    @classmethod
    def from_json(cls, data: dict) -> ReplayProbe:
        return cls(data["system"], data["machine"], data.get("files", {}), data.get("paths", []),
                   data.get("commands", {}), data.get("provenance"))

    def to_json(self) -> dict:
        """The probe file's format, the one `load` reads."""
        return {"provenance": self.provenance, "system": self.probe_system, "machine": self.probe_machine,
                "files": dict(self.files), "paths": list(self.paths), "commands": dict(self.commands)}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"

    @property
    def synthetic(self) -> bool:
        return (self.provenance or "").startswith("synthetic")

    def system(self) -> str:
        return self.probe_system

    def machine(self) -> str:
        return self.probe_machine

    def read_file(self, path: str) -> str | None:
        return self.files.get(path)

    def exists(self, path: str) -> bool:
        return path in self.paths or path in self.files

    def run(self, command: str) -> str | None:
        return self.commands.get(command)


class CapturingProbe(SystemProbe):
    """Wraps a probe (by default this machine's) and keeps what detection read through it: every file read, every
    path checked that exists, every command run, with its output. What the wrapped probe could not read (None) and
    paths that do not exist are left out, so replaying the capture reads them as absent too."""

    def __init__(self, inner: SystemProbe | None = None):
        self.inner = inner or SystemProbe()
        self.files: dict[str, str] = {}
        self.paths: list[str] = []
        self.commands: dict[str, str] = {}

    def system(self) -> str:
        return self.inner.system()

    def machine(self) -> str:
        return self.inner.machine()

    def read_file(self, path: str) -> str | None:
        text = self.inner.read_file(path)
        if text is not None:
            self.files.setdefault(path, text)
        return text

    def exists(self, path: str) -> bool:
        found = self.inner.exists(path)
        if found and path not in self.paths:
            self.paths.append(path)
        return found

    def run(self, command: str) -> str | None:
        out = self.inner.run(command)
        if out is not None:
            self.commands.setdefault(command, out)
        return out

    def replay(self, provenance: str) -> ReplayProbe:
        return ReplayProbe(self.inner.system(), self.inner.machine(), dict(self.files), list(self.paths),
                           dict(self.commands), provenance)


def capture(inner: SystemProbe | None = None) -> ReplayProbe:
    """Run detection here through a `CapturingProbe` and return what it read, as a probe file to replay."""
    probe = CapturingProbe(inner)
    detect(probe)
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return probe.replay(f"captured by `edgepack targets --dump-probe` on {day}")


@dataclass(frozen=True)
class CudaGpu:
    name: str
    memory_bytes: int
    compute_capability: str
    driver: str


@dataclass(frozen=True)
class DeviceInfo:
    os: str
    machine: str  # x86_64, aarch64, arm64
    cpu_model: str | None
    physical_cores: int | None
    logical_cores: int | None
    isa_features: tuple[str, ...]
    ram_total_bytes: int | None
    ram_available_bytes: int | None
    apple_chip: str | None = None
    metal: bool = False
    jetson_model: str | None = None
    l4t_release: str | None = None
    jetpack: str | None = None
    power_mode: str | None = None
    jetson_gpu_usable: bool | None = None
    shared_gpu_memory: bool = False  # Apple Silicon and Jetson: the GPU uses the same RAM
    cuda_gpus: tuple[CudaGpu, ...] = ()
    board: str | None = None  # the device-tree model string where there is one
    notes: tuple[str, ...] = ()

    @property
    def int8_isa(self) -> str:
        return int8_isa(self.machine, set(self.isa_features))


def _cpuinfo_fields(text: str) -> list[dict[str, str]]:
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks


def _linux_cpu(probe: SystemProbe, notes: list[str]) -> tuple[str | None, int | None, int | None, tuple[str, ...]]:
    text = probe.read_file("/proc/cpuinfo")
    if text is None:
        notes.append("/proc/cpuinfo unreadable: CPU model, cores and ISA features unknown")
        return None, None, None, ()
    blocks = _cpuinfo_fields(text)
    processors = [b for b in blocks if "processor" in b]
    logical = len(processors) or None
    cores = {(b.get("physical id", "0"), b["core id"]) for b in processors if "core id" in b}
    physical = len(cores) or logical  # ARM kernels list one entry per core and no "core id"
    first = processors[0] if processors else {}
    model = first.get("model name")
    if model is None and "CPU part" in first:
        part = first["CPU part"].lower()
        model = ARM_CORES.get(part)
        if model is None:
            notes.append(f"unknown ARM CPU part {part}")
            model = f"ARM CPU part {part}"
    raw = cpu_flags(text)
    features = [f for f in X86_FEATURES if f in raw] + [name for flag, name in ARM_FEATURES.items() if flag in raw]
    return model, physical, logical, tuple(features)


def _linux_memory(probe: SystemProbe, notes: list[str]) -> tuple[int | None, int | None]:
    text = probe.read_file("/proc/meminfo")
    if text is None:
        notes.append("/proc/meminfo unreadable: RAM unknown")
        return None, None
    values = {}
    for line in text.splitlines():
        match = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if match:
            values[match.group(1)] = int(match.group(2)) * 1024
    return values.get("MemTotal"), values.get("MemAvailable")


def _jetson(probe: SystemProbe, model: str | None, notes: list[str]) -> dict:
    release_text = probe.read_file("/etc/nv_tegra_release")
    if not (model and "jetson" in model.lower()) and release_text is None:
        return {}
    info: dict = {"jetson_model": model, "shared_gpu_memory": True}
    if release_text:
        match = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", release_text)
        if match:
            l4t = f"{match.group(1)}.{match.group(2)}"
            info["l4t_release"] = l4t
            info["jetpack"] = next((jp for prefix, jp in JETPACK_BY_L4T.items()
                                    if l4t == prefix or l4t.startswith(prefix + ".")), None)
            if info["jetpack"] is None:
                notes.append(f"L4T {l4t} is not in edgepack's JetPack table")
    else:
        notes.append("/etc/nv_tegra_release missing: L4T and JetPack versions unknown")
    power = probe.run("nvpmodel -q")
    if power:
        match = re.search(r"NV Power Mode:\s*(.+)", power)
        info["power_mode"] = match.group(1).strip() if match else None
    else:
        notes.append("nvpmodel not available: power mode unknown")
    info["jetson_gpu_usable"] = probe.exists("/dev/nvgpu/igpu0/ctrl") or probe.exists("/dev/nvhost-ctrl-gpu")
    return info


def _cuda_gpus(probe: SystemProbe) -> tuple[CudaGpu, ...]:
    out = probe.run(NVIDIA_SMI_QUERY)
    gpus = []
    for line in (out or "").strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[1].isdigit():
            gpus.append(CudaGpu(parts[0], int(parts[1]) * 2**20, parts[2], parts[3]))
    return tuple(gpus)


def _sysctl(probe: SystemProbe) -> dict[str, str]:
    values = {}
    for line in (probe.run("sysctl -a") or "").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def _macos(probe: SystemProbe, notes: list[str]) -> DeviceInfo:
    values = _sysctl(probe)
    if not values:
        notes.append("sysctl unavailable: CPU and memory unknown")
    chip = values.get("machdep.cpu.brand_string")
    apple = chip if chip and chip.startswith("Apple") else None
    features = tuple(name for key, name in MACOS_ARM_FEATURES.items() if values.get(key) == "1")
    total = int(values["hw.memsize"]) if values.get("hw.memsize", "").isdigit() else None
    available = None
    vm = probe.run("vm_stat")
    if vm:
        page = re.search(r"page size of (\d+) bytes", vm)
        free = sum(int(m) for m in re.findall(r"Pages (?:free|inactive|speculative):\s+(\d+)", vm))
        available = free * int(page.group(1)) if page else None
    machine = probe.machine()
    return DeviceInfo(
        os="macOS", machine=machine, cpu_model=chip,
        physical_cores=int(values["hw.physicalcpu"]) if values.get("hw.physicalcpu", "").isdigit() else None,
        logical_cores=int(values["hw.logicalcpu"]) if values.get("hw.logicalcpu", "").isdigit() else None,
        isa_features=features, ram_total_bytes=total, ram_available_bytes=available, apple_chip=apple,
        metal=apple is not None and machine == "arm64", shared_gpu_memory=apple is not None, notes=tuple(notes))


def detect(probe: SystemProbe | None = None) -> DeviceInfo:
    probe = probe or SystemProbe()
    notes: list[str] = []
    system = probe.system()
    if system == "Darwin":
        return _macos(probe, notes)
    if system != "Linux":
        notes.append(f"{system}: only Linux and macOS are detected in detail")
    model, physical, logical, features = _linux_cpu(probe, notes)
    total, available = _linux_memory(probe, notes)
    board = (probe.read_file("/proc/device-tree/model") or "").replace("\x00", "").strip() or None
    jetson = _jetson(probe, board, notes)
    return DeviceInfo(os=system, machine=probe.machine(), cpu_model=model, physical_cores=physical,
                      logical_cores=logical, isa_features=features, ram_total_bytes=total,
                      ram_available_bytes=available, cuda_gpus=_cuda_gpus(probe), board=board, notes=tuple(notes),
                      **jetson)
