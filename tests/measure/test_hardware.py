"""Detection on synthetic probe files (written from the public documentation of each device's formats, not
captured from devices), on this machine, and on a capture of this machine made by `edgepack targets --dump-probe`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cli_runner import run_edgepack

from edgepack.measure.hardware import CapturingProbe, ReplayProbe, SystemProbe, capture, detect, int8_isa

DEVICES = Path(__file__).parents[1] / "data" / "devices"


def synthetic(name: str):
    return detect(ReplayProbe.load(DEVICES / f"{name}.json"))


def test_synthetic_jetson_orin_nano():
    info = synthetic("jetson-orin-nano")
    assert info.jetson_model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert info.l4t_release == "36.3.0" and info.jetpack == "6.0"
    assert info.power_mode == "15W" and info.jetson_gpu_usable is True and info.shared_gpu_memory
    assert info.cpu_model == "Cortex-A78AE" and info.physical_cores == info.logical_cores == 6
    assert {"neon", "dotprod", "fp16"} <= set(info.isa_features) and "i8mm" not in info.isa_features
    assert info.ram_total_bytes == 7620500 * 1024 and info.ram_available_bytes == 5912340 * 1024
    assert info.int8_isa == "arm64" and info.cuda_gpus == () and info.notes == ()


def test_synthetic_raspberry_pi_5():
    info = synthetic("raspberry-pi-5")
    assert info.board == "Raspberry Pi 5 Model B Rev 1.0"
    assert info.cpu_model == "Cortex-A76" and info.physical_cores == 4
    assert info.jetson_model is None and info.jetpack is None and not info.shared_gpu_memory
    assert "dotprod" in info.isa_features and info.ram_total_bytes == 8245836 * 1024


def test_synthetic_apple_m2():
    info = synthetic("apple-m2")
    assert info.os == "macOS" and info.apple_chip == "Apple M2" and info.metal and info.shared_gpu_memory
    assert info.ram_total_bytes == 16 * 2**30 and info.physical_cores == 8
    assert {"neon", "dotprod", "i8mm"} <= set(info.isa_features)
    assert info.ram_available_bytes == (61234 + 389877 + 12345) * 16384


def test_synthetic_x86_with_rtx_4090():
    info = synthetic("x86-rtx4090")
    assert info.cpu_model == "AMD Ryzen 9 7950X 16-Core Processor"
    assert info.physical_cores == 16 and info.logical_cores == 32
    assert {"avx2", "avx512f", "avx512_vnni", "f16c"} <= set(info.isa_features)
    assert info.int8_isa == "avx512-vnni"
    (gpu,) = info.cuda_gpus
    assert gpu.name == "NVIDIA GeForce RTX 4090" and gpu.memory_bytes == 24564 * 2**20
    assert gpu.compute_capability == "8.9" and gpu.driver == "550.54.14"


def test_an_odd_machine_is_unknown_not_a_crash():
    info = detect(ReplayProbe("Linux", "riscv64"))
    assert info.cpu_model is None and info.ram_total_bytes is None and info.cuda_gpus == ()
    assert any("/proc/cpuinfo" in note for note in info.notes)
    odd = ReplayProbe("Linux", "aarch64", files={"/proc/cpuinfo": "processor\t: 0\nCPU part\t: 0x999\n",
                                                   "/etc/nv_tegra_release": "# R99 (release), REVISION: 1.0\n"})
    info = detect(odd)
    assert info.cpu_model == "ARM CPU part 0x999" and info.l4t_release == "99.1.0" and info.jetpack is None
    assert any("JetPack table" in note for note in info.notes)


def test_this_machine():
    info = detect()
    assert info.logical_cores and info.logical_cores >= 1
    assert info.ram_total_bytes and info.ram_total_bytes > 2**30


@pytest.mark.parametrize("path", sorted(DEVICES.glob("*.json")), ids=lambda p: p.stem)
def test_every_fixture_says_it_is_synthetic(path):
    probe = ReplayProbe.load(path)
    assert probe.synthetic and probe.provenance.startswith("synthetic: written from public documentation of ")
    assert "not captured from a device" in probe.provenance
    assert ReplayProbe.from_json(json.loads(path.read_text())).dumps() == path.read_text()  # the format round-trips


def without_available_ram(info):
    return dataclasses.replace(info, ram_available_bytes=None)


def test_a_dump_of_this_machine_replays_to_what_detect_finds_here(tmp_path):
    out = tmp_path / "probe.json"
    run_edgepack(["targets", "--dump-probe", str(out)], check=True, timeout=120)
    here = detect()
    data = json.loads(out.read_text())
    assert set(data) == {"provenance", "system", "machine", "files", "paths", "commands"}
    assert data["provenance"].startswith("captured by `edgepack targets --dump-probe` on ")
    replayed = ReplayProbe.load(out)
    assert not replayed.synthetic
    assert without_available_ram(detect(replayed)) == without_available_ram(here)
    assert all(Path(p).exists() for p in data["paths"])
    if here.os == "Linux":
        assert "/proc/cpuinfo" in data["files"]


def test_a_dump_to_stdout_is_the_same_probe_file():
    done = run_edgepack(["targets", "--dump-probe", "-"], check=True, timeout=120)
    replayed = ReplayProbe.from_json(json.loads(done.stdout))
    assert without_available_ram(detect(replayed)) == without_available_ram(detect())
    assert run_edgepack(["targets", "--dump-probe", "-", "--json"]).returncode != 0


class _Machine(SystemProbe):
    """A machine where some things are there and some are not, counting what detection asks."""

    def __init__(self):
        self.asked: list[str] = []

    def system(self) -> str:
        return "Linux"

    def machine(self) -> str:
        return "aarch64"

    def read_file(self, path: str) -> str | None:
        self.asked.append(path)
        return {"/proc/cpuinfo": "processor\t: 0\nFeatures\t: asimd asimddp\nCPU part\t: 0xd42\n",
                "/proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\x00"}.get(path)

    def exists(self, path: str) -> bool:
        self.asked.append(path)
        return path == "/dev/nvhost-ctrl-gpu"

    def run(self, command: str) -> str | None:
        self.asked.append(command)
        return None


def test_a_capture_keeps_only_what_was_there_and_replays_the_same():
    machine = _Machine()
    probe = capture(machine)
    assert probe.probe_system == "Linux" and probe.probe_machine == "aarch64"
    assert set(probe.files) == {"/proc/cpuinfo", "/proc/device-tree/model"}  # unreadable files are left out
    assert probe.paths == ["/dev/nvhost-ctrl-gpu"]  # /dev/nvgpu/igpu0/ctrl was checked but is not there
    assert probe.commands == {}  # nvpmodel and nvidia-smi failed
    assert {"/proc/meminfo", "/etc/nv_tegra_release", "/dev/nvgpu/igpu0/ctrl", "nvpmodel -q"} <= set(machine.asked)
    assert detect(probe) == detect(_Machine())
    assert detect(probe).jetson_gpu_usable is True
    capturing = CapturingProbe(ReplayProbe.load(DEVICES / "jetson-orin-nano.json"))
    assert detect(capturing) == synthetic("jetson-orin-nano")
    assert capturing.paths == ["/dev/nvgpu/igpu0/ctrl"] and set(capturing.commands) == {"nvpmodel -q"}


@pytest.mark.parametrize("machine,flags,expected", [("aarch64", set(), "arm64"), ("x86_64", {"avx2"}, "avx2"),
                                                    ("x86_64", {"avx2", "avx_vnni"}, "avx512-vnni")])
def test_int8_isa(machine, flags, expected):
    assert int8_isa(machine, flags) == expected
