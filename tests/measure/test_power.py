"""Joules per token from energy counters: the RAPL arithmetic on a synthetic powercap tree (written here in
Linux's sysfs layout, not read from a machine), including a counter that wraps around."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.measure.power import RaplMeter, SampledPowerMeter, rapl_domains


def _domain(root: Path, name: str, energy_uj: int, range_uj: int = 262_143_328_850) -> Path:
    domain = root / name
    domain.mkdir(parents=True)
    (domain / "energy_uj").write_text(f"{energy_uj}\n")
    (domain / "max_energy_range_uj").write_text(f"{range_uj}\n")
    return domain


def test_top_level_rapl_domains_are_summed_and_a_wrapped_counter_is_unwrapped(tmp_path):
    package0 = _domain(tmp_path, "intel-rapl:0", 1_000_000)
    package1 = _domain(tmp_path, "intel-rapl:1", 262_143_000_000)  # 328,850 uJ before it wraps
    _domain(tmp_path, "intel-rapl:0:0", 5)  # the core sub-zone: a part of package 0, not counted again
    domains = rapl_domains(tmp_path)
    assert [d.name for d in domains] == ["intel-rapl:0", "intel-rapl:1"]
    meter = RaplMeter(domains)
    (package0 / "energy_uj").write_text("3500000\n")  # +2.5 J
    (package1 / "energy_uj").write_text("671150\n")  # wrapped: 328,850 + 671,150 uJ = +1.0 J
    assert meter.read_joules() == pytest.approx(3.5)
    (package0 / "energy_uj").write_text("4000000\n")  # +0.5 J more
    assert meter.read_joules() == pytest.approx(4.0)


def test_an_unreadable_counter_is_no_domain(tmp_path):
    domain = _domain(tmp_path, "intel-rapl:0", 1)
    (domain / "energy_uj").write_text("permission denied\n")
    assert rapl_domains(tmp_path) == []


def test_a_sampled_constant_power_integrates_to_watts_times_seconds():
    import time

    meter = SampledPowerMeter(lambda: 4.0, "constant")
    start = time.perf_counter()
    begin = meter.read_joules()
    time.sleep(0.3)
    joules = meter.read_joules() - begin
    elapsed = time.perf_counter() - start
    meter.close()
    assert joules == pytest.approx(4.0 * elapsed, rel=0.05)
