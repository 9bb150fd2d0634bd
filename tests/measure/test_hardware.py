"""Detection on recorded outputs of real devices, and on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.measure.hardware import RecordedProbe, detect, int8_isa

DEVICES = Path(__file__).parents[1] / "data" / "devices"


def recorded(name: str):
    return detect(RecordedProbe.load(DEVICES / f"{name}.json"))


def test_jetson_orin_nano():
    info = recorded("jetson-orin-nano")
    assert info.jetson_model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert info.l4t_release == "36.3.0" and info.jetpack == "6.0"
    assert info.power_mode == "15W" and info.jetson_gpu_usable is True and info.shared_gpu_memory
    assert info.cpu_model == "Cortex-A78AE" and info.physical_cores == info.logical_cores == 6
    assert {"neon", "dotprod", "fp16"} <= set(info.isa_features) and "i8mm" not in info.isa_features
    assert info.ram_total_bytes == 7620500 * 1024 and info.ram_available_bytes == 5912340 * 1024
    assert info.int8_isa == "arm64" and info.cuda_gpus == () and info.notes == ()


def test_raspberry_pi_5():
    info = recorded("raspberry-pi-5")
    assert info.board == "Raspberry Pi 5 Model B Rev 1.0"
    assert info.cpu_model == "Cortex-A76" and info.physical_cores == 4
    assert info.jetson_model is None and info.jetpack is None and not info.shared_gpu_memory
    assert "dotprod" in info.isa_features and info.ram_total_bytes == 8245836 * 1024


def test_apple_m2():
    info = recorded("apple-m2")
    assert info.os == "macOS" and info.apple_chip == "Apple M2" and info.metal and info.shared_gpu_memory
    assert info.ram_total_bytes == 16 * 2**30 and info.physical_cores == 8
    assert {"neon", "dotprod", "i8mm"} <= set(info.isa_features)
    assert info.ram_available_bytes == (61234 + 389877 + 12345) * 16384


def test_x86_with_rtx_4090():
    info = recorded("x86-rtx4090")
    assert info.cpu_model == "AMD Ryzen 9 7950X 16-Core Processor"
    assert info.physical_cores == 16 and info.logical_cores == 32
    assert {"avx2", "avx512f", "avx512_vnni", "f16c"} <= set(info.isa_features)
    assert info.int8_isa == "avx512-vnni"
    (gpu,) = info.cuda_gpus
    assert gpu.name == "NVIDIA GeForce RTX 4090" and gpu.memory_bytes == 24564 * 2**20
    assert gpu.compute_capability == "8.9" and gpu.driver == "550.54.14"


def test_an_odd_machine_is_unknown_not_a_crash():
    info = detect(RecordedProbe("Linux", "riscv64"))
    assert info.cpu_model is None and info.ram_total_bytes is None and info.cuda_gpus == ()
    assert any("/proc/cpuinfo" in note for note in info.notes)
    odd = RecordedProbe("Linux", "aarch64", files={"/proc/cpuinfo": "processor\t: 0\nCPU part\t: 0x999\n",
                                                   "/etc/nv_tegra_release": "# R99 (release), REVISION: 1.0\n"})
    info = detect(odd)
    assert info.cpu_model == "ARM CPU part 0x999" and info.l4t_release == "99.1.0" and info.jetpack is None
    assert any("JetPack table" in note for note in info.notes)


def test_this_machine():
    info = detect()
    assert info.logical_cores and info.logical_cores >= 1
    assert info.ram_total_bytes and info.ram_total_bytes > 2**30


@pytest.mark.parametrize("machine,flags,expected", [("aarch64", set(), "arm64"), ("x86_64", {"avx2"}, "avx2"),
                                                    ("x86_64", {"avx2", "avx_vnni"}, "avx512-vnni")])
def test_int8_isa(machine, flags, expected):
    assert int8_isa(machine, flags) == expected
