"""Target profiles: the shipped ones load, a malformed one is refused naming the field, host comes from detection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgepack.core.errors import EdgepackError
from edgepack.measure.hardware import ReplayProbe, detect
from edgepack.measure.targets import host_profile, load_profile, resolve_target, shipped_profiles

REQUIRED = {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "raspberry-pi-5-8gb",
            "apple-m1-8gb", "apple-m2-16gb", "apple-m3-pro-36gb", "x86-avx2-16gb", "x86-avx512-32gb",
            "cuda-rtx4090-24gb"}
GOOD = Path(__file__).resolve().parents[2] / "profiles" / "raspberry-pi-5-8gb.toml"


def test_shipped_profiles_load_and_are_consistent():
    profiles = {p.name: p for p in shipped_profiles()}
    assert REQUIRED <= set(profiles)
    for profile in profiles.values():
        assert 0 < profile.memory_budget_gib <= profile.memory_total_gib
        assert profile.memory_bandwidth_gbps and profile.memory_bandwidth_gbps > 0
        assert profile.memory_budget_reason
    assert profiles["jetson-orin-nano-8gb"].accelerator == "jetson-gpu"
    assert profiles["raspberry-pi-5-8gb"].memory_bandwidth_gbps == pytest.approx(17.1)
    assert profiles["cuda-rtx4090-24gb"].memory_bandwidth_gbps > 10 * profiles["x86-avx2-16gb"].memory_bandwidth_gbps


def test_every_number_in_a_profile_has_its_source_in_a_comment():
    for path in (Path(__file__).resolve().parents[2] / "profiles").glob("*.toml"):
        for line in path.read_text().splitlines():
            if line.startswith("memory_bandwidth_gbps"):
                assert "#" in line, f"{path.name}: bandwidth without a source"


@pytest.mark.parametrize("edit,field", [
    (lambda t: t.replace('arch = "aarch64"\n', ""), "arch"),
    (lambda t: t.replace("memory_budget_gib = 6.5", "memory_budget_gib = 9.5"), "memory_budget_gib"),
    (lambda t: t.replace('accelerator = "none"', 'accelerator = "tpu"'), "accelerator"),
    (lambda t: t.replace("cpu_cores = 4 ", 'cpu_cores = "four" '), "cpu_cores"),
    (lambda t: t.replace('formats = ["gguf", "onnx"]', 'formats = ["safetensors"]'), "formats"),
    (lambda t: t + 'colour = "red"\n', "colour"),
    # names and text that reach generated files (unit names, shell lines, Dockerfiles, comments)
    (lambda t: t.replace('name = "raspberry-pi-5-8gb"', 'name = "../../etc/cron.d/x"'), "name"),
    (lambda t: t.replace('name = "raspberry-pi-5-8gb"', 'name = "pi\\nExecStartPre=/bin/sh"'), "name"),
    (lambda t: t.replace('python_version = "3.11"', 'python_version = "3.11-slim\\nRUN rm -rf /"'), "python_version"),
    (lambda t: t.replace('memory_budget_reason = "', 'memory_budget_reason = "x\\nMemoryMax=infinity '),
     "memory_budget_reason"),
])
def test_a_malformed_profile_names_the_field(tmp_path, edit, field):
    broken = tmp_path / "mine.toml"
    broken.write_text(edit(GOOD.read_text()))
    with pytest.raises(EdgepackError, match=f"field '{field}'"):
        load_profile(broken)


def test_invalid_toml_and_unknown_target(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(EdgepackError, match="not valid TOML"):
        load_profile(bad)
    with pytest.raises(EdgepackError, match="unknown target 'pi-zero'.*raspberry-pi-5-8gb"):
        resolve_target("pi-zero")
    assert resolve_target("apple-m2-16gb").memory_bandwidth_gbps == 100
    assert resolve_target(profile_file=GOOD).name == "raspberry-pi-5-8gb"


def test_host_profile_from_detection():
    jetson = host_profile(detect(ReplayProbe.load(Path(__file__).parents[1] / "data" / "devices" /
                                                    "jetson-orin-nano.json")))
    assert jetson.accelerator == "jetson-gpu" and jetson.arch == "aarch64" and jetson.int8_isa == "arm64"
    # available less 1 GiB headroom (4.64), rounded down to a 0.25 GiB step
    assert jetson.memory_budget_gib == 4.5 and 5912340 * 1024 / 2**30 - 1.0 == pytest.approx(4.64, abs=0.01)
    gpu = host_profile(detect(ReplayProbe.load(Path(__file__).parents[1] / "data" / "devices" / "x86-rtx4090.json")))
    assert gpu.accelerator == "cuda" and gpu.memory_total_gib == pytest.approx(24564 / 1024, abs=0.01)
    here = host_profile()
    assert here.name == "host" and here.memory_budget_gib > 0 and here.memory_bandwidth_gbps is None


def test_targets_cli_json():
    out = subprocess.run([sys.executable, "-m", "edgepack", "targets", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    names = {t["name"] for t in json.loads(out.stdout)["targets"]}
    assert REQUIRED | {"host"} <= names
