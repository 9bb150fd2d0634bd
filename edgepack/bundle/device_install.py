"""Install edgepack on a device measured over SSH (`--measure-on`) that lacks it: the wheels of the variants' engines,
downloaded here for the device's platform and Python as for a bundle's `--offline-wheels`, go over by scp and are
installed into a throwaway venv under ~/.cache/edgepack/measure-on/ there, with no network on the device."""

from __future__ import annotations

import shlex
import tempfile
from dataclasses import replace
from pathlib import Path

from edgepack.bundle.wheels import download_wheels
from edgepack.core.progress import say
from edgepack.core.versions import EDGEPACK_VERSION
from edgepack.measure.hardware import DeviceInfo
from edgepack.measure.remote import DeviceStepError, SshDevice, SshSession, reported
from edgepack.measure.targets import host_profile


def install_on_device(session: SshSession, device: SshDevice, root: str, engines: set[str]) -> str:
    """A throwaway venv on the device, from wheels built here for its platform and Python; its python's path."""
    step = "install edgepack on the device"
    facts = session.run(step, f"{shlex.quote(device.python)} -c " + shlex.quote(
        "import platform, sys; print(platform.system(), platform.machine(), "
        "f'{sys.version_info.major}.{sys.version_info.minor}')")).split()
    if len(facts) != 3:
        raise DeviceStepError(device.url, step, f"{device.python} did not say its platform: {' '.join(facts)!r}")
    system = reported(device.url, step, "its system", "system", facts[0])
    machine = reported(device.url, step, "its machine", "machine", facts[1])
    python_version = reported(device.url, step, "its Python version", "python version", facts[2])
    target = replace(host_profile(DeviceInfo(os=system, machine=machine, cpu_model=None, physical_cores=1,
                                             logical_cores=1, isa_features=(), ram_total_bytes=0,
                                             ram_available_bytes=0)),
                     python_version=python_version)
    venv = f"{root}/venv-{EDGEPACK_VERSION}-py{python_version}"
    made = session.run_allowing_failure(step, f"{shlex.quote(venv)}/bin/python -c "
                                        + shlex.quote("import edgepack; print(edgepack.__version__)"))
    if made.returncode == 0 and made.stdout.strip() == EDGEPACK_VERSION:  # installed by an earlier run
        return f"{venv}/bin/python"
    with tempfile.TemporaryDirectory(prefix="edgepack-wheelhouse-") as tmp:
        houses = []
        for engine in sorted(engines):
            dest = Path(tmp) / f"wheels-{engine}"
            download_wheels(dest, engine, target)
            houses.append(dest)
        session.run(step, f"rm -rf {shlex.quote(venv)} && mkdir -p {shlex.quote(venv)}")
        for house in houses:
            say(f"copying {house.name} to {device.url}")
            session.put(step, house, f"{venv}/{house.name}")
    commands = [f"{shlex.quote(device.python)} -m venv {shlex.quote(venv)}"]
    for house in houses:
        where = shlex.quote(f"{venv}/{house.name}")
        commands.append(f"{shlex.quote(venv)}/bin/pip install -q --no-index --find-links {where} "
                        f"-r {where}/requirements.txt")
    commands.append(f"{shlex.quote(venv)}/bin/pip install -q --no-index --no-deps {shlex.quote(venv)}/"
                    f"{houses[0].name}/edgepack-*.whl")
    session.run(step, " && ".join(commands), timeout_s=3600)
    return f"{venv}/bin/python"
