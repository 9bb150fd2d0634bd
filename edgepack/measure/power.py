"""Energy while decoding, where a sensor is readable: RAPL energy counters on Linux x86
(/sys/class/powercap/intel-rapl:N/energy_uj, the CPU packages), NVIDIA GPUs through nvidia-smi, Jetson boards' INA3221
rails. A meter gives the joules used since it started; the profiler reads it when the first token comes and when the
last has, so joules per token cover decoding only (the whole package or board, not this process alone)."""

from __future__ import annotations

import glob
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")
SAMPLE_EVERY_S = 0.05


class RaplMeter:
    """Sums the energy counters of the top-level RAPL domains (one per CPU package), allowing for a counter that
    wrapped around once between two reads."""

    source = "RAPL energy counters"

    def __init__(self, domains: list[Path]) -> None:
        self.domains = domains
        self.ranges = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        self.last = [self._read(d) for d in domains]
        self.total_uj = 0

    @staticmethod
    def _read(domain: Path) -> int:
        return int((domain / "energy_uj").read_text())

    def read_joules(self) -> float:
        for i, domain in enumerate(self.domains):
            now = self._read(domain)
            self.total_uj += now - self.last[i] if now >= self.last[i] else now + self.ranges[i] - self.last[i]
            self.last[i] = now
        return self.total_uj / 1e6

    def close(self) -> None:
        pass


class SampledPowerMeter:
    """Integrates a power reading (watts) sampled on a thread every SAMPLE_EVERY_S seconds (trapezoids)."""

    def __init__(self, read_watts: Callable[[], float], source: str) -> None:
        self.read_watts, self.source = read_watts, source
        self.joules = 0.0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.last = (time.perf_counter(), read_watts())
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        now, watts = time.perf_counter(), self.read_watts()
        with self.lock:
            then, before = self.last
            self.joules += (now - then) * (watts + before) / 2
            self.last = (now, watts)

    def _run(self) -> None:
        while not self.stopped.wait(SAMPLE_EVERY_S):
            self._sample()

    def read_joules(self) -> float:
        self._sample()
        with self.lock:
            return self.joules

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2)


def rapl_domains(root: Path = RAPL_ROOT) -> list[Path]:
    """The readable top-level domains (intel-rapl:0, intel-rapl:1, …; their sub-zones are parts of them)."""
    found = []
    for domain in sorted(root.glob("intel-rapl:*")):
        if domain.name.count(":") != 1:
            continue
        try:
            int((domain / "energy_uj").read_text())
            int((domain / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue  # unreadable (root-only since 2020 on most distributions)
        found.append(domain)
    return found


def _nvidia_watts() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=power.draw", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=5)
    return sum(float(v) for v in out.stdout.split())


def _ina3221_watts() -> float:
    volts = sorted(glob.glob("/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_input"))
    amps = sorted(glob.glob("/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/curr*_input"))
    pairs = zip(volts, amps, strict=True)
    return sum(int(Path(v).read_text()) / 1000 * int(Path(a).read_text()) / 1000 for v, a in pairs)


def open_meter(device: str = "cpu") -> RaplMeter | SampledPowerMeter | None:
    """The meter for what decodes: the GPU's board power when the model runs on an NVIDIA GPU, a Jetson's rails,
    else the CPU packages' RAPL counters; None where nothing is readable."""
    if device == "cuda":
        try:
            _nvidia_watts()
            return SampledPowerMeter(_nvidia_watts, "nvidia-smi power.draw")
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    volts = glob.glob("/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_input")
    if volts and len(volts) == len(glob.glob("/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/curr*_input")):
        try:
            _ina3221_watts()
            return SampledPowerMeter(_ina3221_watts, "INA3221 rails")
        except (OSError, ValueError):
            pass
    domains = rapl_domains()
    return RaplMeter(domains) if domains else None
