"""Measure variants on the real device over SSH (`--measure-on ssh://user@host[:port]`).

The system's `ssh` and `scp` do the work, so keys, known_hosts and ~/.ssh/config are the user's own SSH setup;
BatchMode is on, so nothing ever asks for a password. The steps, each named in any error:
1. connect: a command that only echoes;
2. find edgepack: the device's Python (`--remote-python`, default python3) must import this edgepack version;
   otherwise the variants' engines and edgepack go over as an offline wheelhouse into a throwaway venv there;
3. describe the device: `python -m edgepack.measure.device_report` (detection and the read-bandwidth kernel);
4. per variant, upload (kept on the device under ~/.cache/edgepack/measure-on/, keyed by the variant's sha256) and
   measure: `python -m edgepack.measure.profiler` in a child process of its own, whose JSON comes back.
Measurements are cached per device (its detected description) and variant, like the measurements made here.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from edgepack.core.artifacts import CrashedVariant, Variant
from edgepack.core.cache import digest_of
from edgepack.core.errors import EdgepackError, EngineCrashedError
from edgepack.core.isolation import describe_exit
from edgepack.core.progress import say
from edgepack.core.versions import EDGEPACK_VERSION
from edgepack.measure.device_report import describe, device_from_dict
from edgepack.measure.device_values import bandwidth_problem, device_info_problem, value_problem
from edgepack.measure.hardware import DeviceInfo
from edgepack.measure.predict import ACHIEVABLE_SHARE_OF_SPEC
from edgepack.measure.profiler import DeviceMeasurements, Measurement, ProfileOptions, power_notes
from edgepack.measure.targets import TargetProfile

REMOTE_ROOT = ".cache/edgepack/measure-on"  # under the device account's home
CONNECT_TIMEOUT_S = 15
# what ssh may take as a user or a host name: never a leading '-', which ssh would read as an option
# (ssh://-oProxyCommand=...@host runs a command here)
SSH_USER = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}")
SSH_HOST = re.compile(r"[A-Za-z0-9_:][A-Za-z0-9_.:%-]{0,252}")
# a shell on the device reports a child killed by signal N as exit status 128 + N, and ssh passes that on
SIGNAL_EXIT_BASE = 128


class DeviceStepError(EdgepackError):
    """A step of measuring on a device over SSH failed; the message names the device and the step."""

    def __init__(self, url: str, step: str, detail: str) -> None:
        super().__init__(f"measuring on {url}: the step '{step}' failed: {detail}")
        self.step = step


@dataclass(frozen=True)
class SshDevice:
    host: str
    user: str | None = None
    port: int | None = None
    config_file: Path | None = None  # ssh -F; None: the user's own ~/.ssh/config
    python: str = "python3"  # the device's interpreter

    @property
    def url(self) -> str:
        return f"ssh://{self.user + '@' if self.user else ''}{self.host}{f':{self.port}' if self.port else ''}"


def parse_ssh_url(text: str, config_file: Path | None = None, python: str = "python3") -> SshDevice:
    """`ssh://[user@]host[:port]`; anything else is refused with what is accepted."""
    accepted = "accepted: ssh://[user@]host[:port], e.g. ssh://pi@192.168.1.20 or ssh://nvidia@orin.local:2222"
    parts = urlsplit(text.strip())
    try:
        port = parts.port
    except ValueError:
        raise EdgepackError(f"--measure-on {text!r}: the port is not a number from 1 to 65535; {accepted}") from None
    if parts.scheme != "ssh" or not parts.hostname or parts.password or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise EdgepackError(f"--measure-on {text!r} is not an SSH address (a password never goes on the command "
                            f"line: use a key); {accepted}")
    for what, value, pattern in (("user", parts.username, SSH_USER), ("host", parts.hostname, SSH_HOST)):
        if value is not None and not pattern.fullmatch(value):
            raise EdgepackError(f"--measure-on {text!r}: the {what} {value!r} is not a plain name (letters, digits "
                                f"and . _ -, not starting with '-'); {accepted}")
    if config_file is not None and not Path(config_file).is_file():
        raise EdgepackError(f"--ssh-config {config_file}: no such file")
    return SshDevice(host=parts.hostname, user=parts.username, port=port, config_file=config_file, python=python)


class SshSession:
    """Commands and copies to one device, each a fresh ssh/scp process."""

    def __init__(self, device: SshDevice) -> None:
        self.device = device

    def _options(self, port_flag: str) -> list[str]:
        d = self.device
        options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]
        if d.config_file is not None:
            options = ["-F", str(d.config_file), *options]
        if d.port is not None:
            options += [port_flag, str(d.port)]
        return options

    @property
    def _destination(self) -> str:
        return f"{self.device.user}@{self.device.host}" if self.device.user else self.device.host

    def _ssh_argv(self, command: str) -> list[str]:
        # "--" ends ssh's options: nothing after it is read as one, whatever the destination looks like
        return ["ssh", *self._options("-p"), "--", self._destination, command]

    def run(self, step: str, command: str, timeout_s: float = 600) -> str:
        """The remote command's stdout; DeviceStepError when ssh or the command fails."""
        done = self._call(step, self._ssh_argv(command), timeout_s)
        return done.stdout

    def run_allowing_failure(self, step: str, command: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self._ssh_argv(command), capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DeviceStepError(self.device.url, step, f"no answer within {timeout_s:.0f} s") from None

    def put(self, step: str, local: Path, remote: str, timeout_s: float = 3600) -> None:
        """Copy a file or a directory (recursively) to `remote`, an absolute path on the device."""
        self._call(step, ["scp", "-q", "-r", *self._options("-P"), "--", str(local), f"{self._destination}:{remote}"],
                   timeout_s)

    def _call(self, step: str, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except FileNotFoundError:
            raise DeviceStepError(self.device.url, step, f"`{argv[0]}` is not installed here (OpenSSH's client "
                                                         "is needed for --measure-on)") from None
        except subprocess.TimeoutExpired:
            raise DeviceStepError(self.device.url, step, f"no answer within {timeout_s:.0f} s") from None
        if done.returncode != 0:
            raise DeviceStepError(self.device.url, step, _failure(done))
        return done


def _failure(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr or "").strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no message"
    if done.returncode == 255:  # ssh's own failure: the connection, the key or the host key
        return (f"ssh could not connect: {last} (check that `ssh` to this address works without a password: "
                "keys and known_hosts come from your SSH setup)")
    return f"exit status {done.returncode}: {last}"


@dataclass(frozen=True)
class DeviceSide:
    """What the device said about itself, and where edgepack runs there."""

    session: SshSession
    python: str
    root: str  # absolute path of REMOTE_ROOT on the device
    info: DeviceInfo
    edgepack_version: str
    python_version: str
    bandwidth_gbps: dict[int, float]
    engine_devices: dict[str, tuple[str, ...]]  # where each installed engine can run a model there

    @property
    def gpu(self) -> str | None:
        """The device's GPU a bundle serves on: cuda (a CUDA GPU, a Jetson's), metal (Apple Silicon), or None."""
        return "cuda" if self.info.cuda_gpus or self.info.jetson_gpu_usable else "metal" if self.info.metal else None

    @property
    def description(self) -> str:
        return describe(self.info)


# (session, device, root on the device, engines) -> the path of a Python with this edgepack there
Installer = Callable[[SshSession, SshDevice, str, set[str]], str]


def connect(device: SshDevice, engines: set[str], threads: int | None, install: Installer | None = None
            ) -> DeviceSide:
    """Steps 1-3: reach the device, make sure this edgepack runs there (with `install` where it does not: the
    wheelhouse installer of edgepack/bundle/device_install.py), and describe the device."""
    session = SshSession(device)
    say(f"connecting to {device.url}")
    root = session.run("connect", f"mkdir -p {REMOTE_ROOT} && cd {REMOTE_ROOT} && pwd").strip()
    reported(device.url, "connect", "its working folder", "path", root)
    python = device.python
    probe = session.run_allowing_failure("find edgepack", f"{shlex.quote(python)} -c "
                                         + shlex.quote("import edgepack; print(edgepack.__version__)"))
    found = probe.stdout.strip() if probe.returncode == 0 else None
    if found != EDGEPACK_VERSION:
        why = f"edgepack {found}" if found else "no edgepack"
        if install is None:
            raise DeviceStepError(device.url, "find edgepack", f"{python} has {why}, and this is edgepack "
                                  f"{EDGEPACK_VERSION}: install it there, or pass --remote-python")
        say(f"{device.url}: {python} has {why}; installing edgepack {EDGEPACK_VERSION} there from an offline "
            "wheelhouse")
        python = install(session, device, root, engines)
    report = session.run("describe the device", f"{shlex.quote(python)} -m edgepack.measure.device_report "
                         + (str(threads) if threads else ""))
    try:
        data = json.loads(report.strip().splitlines()[-1])
        info = device_from_dict(data["device"])
        engine_devices = {name: tuple(devices) for name, devices in data.get("engines", {}).items()}
        bandwidth = {int(t): v for t, v in data["bandwidth_gbps"].items()}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise DeviceStepError(device.url, "describe the device",
                              f"unreadable answer ({exc}): {report[-200:]!r}") from None
    check_description(device.url, data, info)
    return DeviceSide(session=session, python=python, root=root, info=info, edgepack_version=data["edgepack"],
                      python_version=data["python"], engine_devices=engine_devices,
                      bandwidth_gbps={t: checked_bandwidth(device.url, t, value) for t, value in bandwidth.items()})


def reported(url: str, step: str, what: str, kind: str, value: object) -> str:
    """`value`, a `kind` of device_values the device reported as `what`; DeviceStepError naming both where it does
    not match its pattern, before it reaches a command or a generated file."""
    problem = value_problem(kind, value)
    if problem:
        raise DeviceStepError(url, step, f"the device reported {what} {value!r}, which {problem}; refusing to use "
                                         "it (it would reach commands and the bundle's generated files)")
    return str(value)


def check_description(url: str, data: dict, info: DeviceInfo) -> None:
    """The device_report's versions and device description, each checked against its pattern."""
    step = "describe the device"
    reported(url, step, "its Python version", "python version", data.get("python"))
    reported(url, step, "its edgepack version", "package version", data.get("edgepack"))
    bad = device_info_problem(info)
    if bad is not None:
        field, value, why = bad
        raise DeviceStepError(url, step, f"the device reported {field} {value!r}, which {why}; refusing to use it "
                                         "(it would reach the bundle's generated files)")


def checked_bandwidth(url: str, threads: int, value: object) -> float:
    problem = bandwidth_problem(value)
    if problem:
        raise DeviceStepError(url, "describe the device", f"the device reported a bandwidth at {threads} threads "
                                                          f"of {value!r}, which {problem}")
    return float(value)  # type: ignore[arg-type]


def measure_on_device(side: DeviceSide, variants: list[Variant], options: ProfileOptions, cache=None,
                      force: bool = False) -> DeviceMeasurements:
    """Step 4 for every variant: upload it once, measure it in a child process there. `cache`: the build's
    StageCache, where measurements are kept per device and variant."""
    threads = options.threads or side.info.physical_cores or 1
    bandwidth = side.bandwidth_gbps.get(threads)
    if bandwidth is None:
        bandwidth = _bandwidth_at(side, threads)
    identity = {"device": side.description, "machine": side.info.machine, "edgepack": side.edgepack_version,
                "python": side.python_version}
    measured: list[Measurement] = []
    crashed: list[CrashedVariant] = []
    notes: list[str] = []
    for v in variants:
        engine = "llamacpp" if v.path.is_file() else "onnxrt"
        device = side.gpu or "cpu"
        if device not in side.engine_devices.get(engine, ("cpu",)):
            if device != "cpu":
                notes.append(f"{v.kind} measured on the device's CPU: its {engine} cannot run on {device}, and a "
                             "bundle's server there falls back to the CPU the same way")
            device = "cpu"
        key = digest_of({"stage": "measure-on", "record": 1, "device": identity, "variant": v.sha256,
                         "threads": threads, "prompt": options.prompt_tokens, "new": options.new_tokens,
                         "runs": options.runs, "context": options.context, "on": device})
        record = None if force or cache is None else cache.load("measure-on", key)
        if record is None:
            remote_path = _upload(side, v)
            say(f"measuring {v.kind} on {side.session.device.url} ({threads} threads)")
            try:
                data = _measure_there(side, v, remote_path, threads, replace(options, device=device))
            except EngineCrashedError as exc:
                crashed.append(CrashedVariant(name=v.kind, path=v.path, stage="measure", cause=exc.cause,
                                              detail=str(exc)))
                continue
            if cache is not None:
                data, _ = cache.store("measure-on", key, lambda _directory, r=data: r, replace_existing=force)
            record = data
        fields = dict(record)
        fields["path"], fields["name"] = v.path, v.kind
        measured.append(Measurement(**fields))
    notes = (f"measured on {side.description} over SSH ({side.session.device.url}), edgepack "
             f"{side.edgepack_version}, Python {side.python_version}", *notes)
    return DeviceMeasurements(memory_bandwidth_gbps=bandwidth, variants=tuple(measured),
                              notes=notes + power_notes(measured), crashed=tuple(crashed),
                              measured_on=side.session.device.url,
                              device_description=side.description)


def _bandwidth_at(side: DeviceSide, threads: int) -> float:
    url = side.session.device.url
    answer = side.session.run("describe the device", f"{shlex.quote(side.python)} -m "
                              f"edgepack.measure.device_report {threads}")
    try:
        value = json.loads(answer.strip().splitlines()[-1])["bandwidth_gbps"][str(threads)]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise DeviceStepError(url, "describe the device", f"unreadable answer ({exc}): {answer[-200:]!r}") from None
    return checked_bandwidth(url, threads, value)


def _upload(side: DeviceSide, v: Variant) -> str:
    """The variant's path on the device: copied there once, under a folder named by its sha256."""
    folder = f"{side.root}/variants/{v.sha256[:32]}"
    remote_path = f"{folder}/{v.path.name}"
    step = f"upload {v.kind}"
    marker = f"{folder}/.complete"
    if side.session.run_allowing_failure(step, f"test -f {shlex.quote(marker)}").returncode == 0:
        return remote_path
    say(f"copying {v.kind} ({v.bytes / 2**20:.0f} MiB) to {side.session.device.url}")
    partial = f"{folder}.partial-{int(time.time())}"
    side.session.run(step, f"rm -rf {shlex.quote(folder)} && mkdir -p {shlex.quote(partial)}")
    side.session.put(step, v.path, f"{partial}/{v.path.name}")
    side.session.run(step, f"echo {v.sha256} > {shlex.quote(partial)}/.complete && mv {shlex.quote(partial)} "
                           f"{shlex.quote(folder)}")
    return remote_path


def _measure_there(side: DeviceSide, v: Variant, remote_path: str, threads: int, options: ProfileOptions) -> dict:
    step = f"measure {v.kind}"
    arguments = [remote_path, threads, options.prompt_tokens, options.new_tokens, options.runs, options.context or 0,
                 options.device]
    # `; exit $?` keeps the shell from exec'ing the profiler, so a signal comes back as 128 + N, not as ssh's 255
    command = f"{shlex.quote(side.python)} -m edgepack.measure.profiler " + " ".join(
        shlex.quote(str(a)) for a in arguments) + "; exit $?"
    done = side.session.run_allowing_failure(step, command, timeout_s=3600)
    if done.returncode > SIGNAL_EXIT_BASE and done.returncode != 255:
        number = done.returncode - SIGNAL_EXIT_BASE
        if number in {s.value for s in signal.Signals}:
            cause, hint = describe_exit(-number)
            raise EngineCrashedError(f"measuring {v.kind} on {side.session.device.url}: the engine crashed with "
                                     f"{cause}; {hint}", cause=cause)
    if done.returncode != 0:
        raise DeviceStepError(side.session.device.url, step, _failure(done))
    try:
        data = json.loads(done.stdout.strip().splitlines()[-1])
        if isinstance(data, list):  # [one measurement]; an older edgepack on the device prints it bare
            (data,) = data
        Measurement(**{**data, "path": Path(data["path"])})
    except (ValueError, TypeError, IndexError) as exc:
        raise DeviceStepError(side.session.device.url, step,
                              f"unreadable answer ({exc}): {done.stdout[-200:]!r}") from None
    return data


def device_target(side: DeviceSide) -> TargetProfile:
    """The device measured over SSH as the build's target: its detected memory less a headroom is the budget, as
    for this machine."""
    from edgepack.measure.targets import host_profile

    profile = host_profile(side.info)
    name = "device-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in side.session.device.host)
    return replace(profile, name=name, description=f"{side.description}, measured over SSH",
                   python_version=side.python_version, source=side.session.device.url,
                   memory_bandwidth_gbps=max(side.bandwidth_gbps.values()) / ACHIEVABLE_SHARE_OF_SPEC,
                   notes="measured over SSH with --measure-on; the bandwidth shown is the device's measured read "
                         f"bandwidth / {ACHIEVABLE_SHARE_OF_SPEC}, so that predictions from it use what was measured")
