"""Measuring on a device over SSH, against a real sshd on 127.0.0.1 (tests/sshd.py): the measurement comes from the
device's own run, and an unreachable device, a failing step and a crashing engine are each named."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from converters.registry import ConvertOptions
from edgepack.convert import convert
from edgepack.core.errors import EdgepackError, EngineCrashedError
from edgepack.measure.profiler import ProfileOptions
from edgepack.measure.remote import DeviceStepError, connect, measure_on_device, parse_ssh_url

PROFILE = ProfileOptions(threads=1, prompt_tokens=16, new_tokens=8, runs=1, show_progress=False)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("remote-variants")
    return convert(tiny_model("llama-bpe"), ["gguf-q8_0"], out, ConvertOptions(show_progress=False))[0]


def _wrapper(device, name: str, body: str) -> str:
    """A script on the device standing in front of its Python: it runs `body` (sh) first."""
    path = device.home / name
    path.write_text(f"#!/bin/sh\n{body}\nexec {device.python} \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def test_ssh_urls_are_parsed_or_refused_with_what_is_accepted():
    device = parse_ssh_url("ssh://pi@192.168.1.20:2222")
    assert (device.user, device.host, device.port, device.url) == ("pi", "192.168.1.20", 2222,
                                                                   "ssh://pi@192.168.1.20:2222")
    assert parse_ssh_url("ssh://orin.local").port is None
    for bad in ("pi@192.168.1.20", "http://host", "ssh://pi:secret@host", "ssh://host:99999", "ssh://host/path"):
        with pytest.raises(EdgepackError, match="accepted: ssh://"):
            parse_ssh_url(bad)


def test_a_variant_is_measured_on_the_device_and_the_figures_are_its_own(ssh_test_device, tiny_gguf):
    log = ssh_test_device.home / "profiler-output.jsonl"
    python = _wrapper(ssh_test_device, "python-logging",
                      f'case "$*" in *edgepack.measure.profiler*) {ssh_test_device.python} "$@" | tee -a {log}; '
                      'exit $? ;; esac')
    device = parse_ssh_url(ssh_test_device.url, config_file=ssh_test_device.config, python=python)
    side = connect(device, {"llamacpp"}, threads=1)
    assert side.bandwidth_gbps[1] > 0.1 and side.info.physical_cores
    result = measure_on_device(side, [tiny_gguf], PROFILE)
    assert result.measured_on == ssh_test_device.url and not result.crashed
    (measurement,) = result.variants
    (printed,) = json.loads(log.read_text().strip().splitlines()[-1])  # what the device's profiler printed
    assert measurement.decode_tps == printed["decode_tps"] and measurement.model_rss_mib == printed["model_rss_mib"]
    # the variant went to the device account's home, and that account ran the profiler
    remote_file = Path(printed["path"])
    assert remote_file.is_file() and str(remote_file).startswith(str(ssh_test_device.home))
    assert remote_file.stat().st_uid == ssh_test_device.home.stat().st_uid
    if os.geteuid() == 0:
        assert ssh_test_device.account != "root" and remote_file.stat().st_uid != 0
    # a second measurement finds the variant already there (uploaded once)
    before = remote_file.stat().st_mtime_ns
    measure_on_device(side, [tiny_gguf], PROFILE)
    assert remote_file.stat().st_mtime_ns == before


def test_an_unreachable_device_names_the_connect_step(ssh_test_device):
    closed = parse_ssh_url("ssh://nobody@127.0.0.1:1", config_file=ssh_test_device.config)
    with pytest.raises(DeviceStepError, match="step 'connect' failed: ssh could not connect") as caught:
        connect(closed, {"llamacpp"}, threads=1)
    assert caught.value.step == "connect"


def test_a_failure_midway_names_the_step_and_the_variant(ssh_test_device, tiny_gguf):
    python = _wrapper(ssh_test_device, "python-failing-profiler",
                      'case "$*" in *edgepack.measure.profiler*) echo "disk full" >&2; exit 3 ;; esac')
    side = connect(parse_ssh_url(ssh_test_device.url, config_file=ssh_test_device.config, python=python),
                   {"llamacpp"}, threads=1)
    with pytest.raises(DeviceStepError, match="step 'measure gguf-q8_0' failed: exit status 3: disk full"):
        measure_on_device(side, [tiny_gguf], PROFILE)


def test_an_engine_crash_on_the_device_rejects_that_variant(ssh_test_device, tiny_gguf):
    python = _wrapper(ssh_test_device, "python-crashing-engine",
                      'case "$*" in *edgepack.measure.profiler*) kill -SEGV $$ ;; esac')
    side = connect(parse_ssh_url(ssh_test_device.url, config_file=ssh_test_device.config, python=python),
                   {"llamacpp"}, threads=1)
    result = measure_on_device(side, [tiny_gguf], PROFILE)
    assert not result.variants
    (crash,) = result.crashed
    assert crash.name == "gguf-q8_0" and "SIGSEGV" in crash.cause
    assert isinstance(EngineCrashedError("x", cause=crash.cause), EdgepackError)


@pytest.mark.wheelhouse
def test_a_device_without_edgepack_gets_a_throwaway_venv_from_a_wheelhouse(ssh_test_device, tiny_model,
                                                                           tmp_path_factory):
    """The device's plain system Python has no edgepack: the ONNX engine's wheelhouse goes over and is installed in
    a venv there (pip downloads the wheels here, for the device's platform)."""
    from sshd import system_python

    from edgepack.bundle.device_install import install_on_device

    plain = system_python()
    if plain is None:
        pytest.skip("no system Python of this version for the device account")
    out = tmp_path_factory.mktemp("remote-onnx")
    (variant,) = convert(tiny_model("llama-bpe"), ["onnx-fp32"], out, ConvertOptions(show_progress=False))
    device = parse_ssh_url(ssh_test_device.url, config_file=ssh_test_device.config, python=plain)
    side = connect(device, {"onnxrt"}, threads=1, install=install_on_device)
    assert side.python.startswith(str(ssh_test_device.home)) and side.python.endswith("/bin/python")
    (measurement,) = measure_on_device(side, [variant], PROFILE).variants
    assert measurement.engine == "onnxrt" and measurement.decode_tps > 0


def test_profile_measures_on_the_device_from_the_command_line(ssh_test_device, tiny_gguf):
    from cli_runner import run_edgepack

    done = run_edgepack(["profile", str(tiny_gguf.path), "--threads", "1", "--prompt-tokens", "16", "--new-tokens",
                         "8", "--runs", "1", "--measure-on", ssh_test_device.url, "--ssh-config",
                         str(ssh_test_device.config), "--remote-python", ssh_test_device.python, "--json"], check=True)
    result = json.loads(done.stdout)
    assert result["measured_on"] == ssh_test_device.url and result["device_description"]
    (measurement,) = result["variants"]
    assert measurement["decode_tps"] > 0 and measurement["name"] == "gguf-q8_0"
    uploaded = list((ssh_test_device.home / ".cache" / "edgepack" / "measure-on" / "variants").glob("*/gguf-q8_0.gguf"))
    assert uploaded and uploaded[0].read_bytes() == tiny_gguf.path.read_bytes()
    refused = run_edgepack(["profile", str(tiny_gguf.path), "--measure-on", "pi@host"])
    assert refused.returncode == 2 and "accepted: ssh://" in refused.stderr
