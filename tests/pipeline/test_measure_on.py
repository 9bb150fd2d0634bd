"""`edgepack build --measure-on ssh://…` against a real sshd on 127.0.0.1 whose account is the device
(tests/sshd.py): the bundle's report says where it was measured and its numbers are the device's own; an
unreachable device fails before anything is written, or, with --allow-predicted, leaves predictions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_runner import run_edgepack

from edgepack.bundle.verify import verify_bundle

FORMATS = "gguf-q8_0"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return {**os.environ, "EDGEPACK_CACHE": str(tmp_path_factory.mktemp("measure-on-cache"))}


def test_a_build_measured_on_the_device_reports_the_devices_own_numbers(ssh_test_device, tiny_model, env, tmp_path):
    log = ssh_test_device.home / "build-profiler-output.jsonl"
    python = ssh_test_device.home / "python-logging-build"
    python.write_text(f'#!/bin/sh\ncase "$*" in *edgepack.measure.profiler*) {ssh_test_device.python} "$@" | tee -a '
                      f'{log}; exit $? ;; esac\nexec {ssh_test_device.python} "$@"\n')
    python.chmod(0o755)
    done = run_edgepack(["build", str(tiny_model("llama-bpe")), "--formats", FORMATS, "--no-behaviour", "--out",
                         str(tmp_path), "--measure-on", ssh_test_device.url, "--ssh-config",
                         str(ssh_test_device.config), "--remote-python", str(python), "--threads", "1", "--json"],
                        env, check=True)
    bundle = Path(json.loads(done.stdout)["bundle"])
    verify_bundle(bundle)
    report = json.loads((bundle / "report.json").read_text())
    device = report["device_measurements"]
    assert device["measured_on"] == ssh_test_device.url
    assert report["target"]["source"] == ssh_test_device.url and report["target"]["name"] == "device-127.0.0.1"
    # each line the device's profiler printed: [its measurement]
    printed = {Path(m["path"]).name: m for (m,) in map(json.loads, log.read_text().splitlines())}
    for p in report["performance"]:
        assert not p["is_prediction"]
        assert p["decode_tps"] == printed[f"{p['variant']}.gguf"]["decode_tps"]  # the device's own run
        assert p["predicted_decode_tps"] > 0 and p["predicted_memory_bytes"] > 0
    markdown = (bundle / "report.md").read_text()
    assert f"**measured on {device['device_description']}** over SSH ({ssh_test_device.url})" in markdown
    assert "## Measured on the device:" in markdown and "| variant | threads | decode t/s measured | predicted |" \
        in markdown


def test_an_unreachable_device_fails_before_writing_or_falls_back_to_predictions(ssh_test_device, tiny_model, env,
                                                                                 tmp_path):
    model = str(tiny_model("llama-bpe"))
    unreachable = ["--measure-on", "ssh://nobody@127.0.0.1:1", "--ssh-config", str(ssh_test_device.config)]
    done = run_edgepack(["build", model, "--formats", FORMATS, "--no-behaviour", "--out", str(tmp_path / "a"),
                         *unreachable], env)
    assert done.returncode == 2
    assert "the step 'connect' failed: ssh could not connect" in done.stderr
    assert not (tmp_path / "a").exists()
    done = run_edgepack(["build", model, "--formats", FORMATS, "--no-behaviour", "--out", str(tmp_path / "b"),
                         *unreachable, "--allow-predicted", "--target", "raspberry-pi-5-8gb", "--json"], env,
                        check=True)
    bundle = Path(json.loads(done.stdout)["bundle"])
    report = json.loads((bundle / "report.json").read_text())
    assert all(p["is_prediction"] for p in report["performance"])
    assert any("not measured on the device" in note and "step 'connect'" in note
               for note in report["host_measurements"]["notes"])
    assert "are **predicted** for raspberry-pi-5-8gb" in (bundle / "report.md").read_text()
