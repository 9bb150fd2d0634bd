"""A real OpenSSH server (Debian's openssh-server) on 127.0.0.1 for the tests of `--measure-on ssh://…`: a throwaway
host key and client key, an ssh_config that pins both, and — when the tests run as root — another account on this
machine as the "device", so that the remote side really runs as someone else. Without root, sshd runs as the
current user (it can then only log that user in)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# one account per pytest-xdist worker, should the tests run in several
DEVICE_ACCOUNT = "edgepack-device" + (f"-{os.environ['PYTEST_XDIST_WORKER']}"
                                      if os.environ.get("PYTEST_XDIST_WORKER") else "")


@dataclass(frozen=True)
class TestDevice:
    url: str
    config: Path  # the ssh_config file to pass as --ssh-config
    account: str
    home: Path
    python: str  # the device's interpreter: this venv's, which every account can read


def sshd_binary() -> str | None:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if Path(p).is_file()), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def system_python() -> str | None:
    """The system's interpreter of this Python's version, which another account can run (this venv's may point into
    a home that only its owner can enter, as pyenv's does)."""
    path = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    return str(path) if path.is_file() else None


def _account() -> tuple[str, Path, bool]:
    """(name, home, made here) of the account the device logs in."""
    if os.geteuid() != 0 or system_python() is None:
        me = pwd.getpwuid(os.getuid())
        return me.pw_name, Path(me.pw_dir), False
    try:
        entry = pwd.getpwnam(DEVICE_ACCOUNT)
        return entry.pw_name, Path(entry.pw_dir), False
    except KeyError:
        # password '*': no password logs in, yet the account is not locked (sshd refuses locked accounts)
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--password", "*", DEVICE_ACCOUNT],
                       check=True)
        return DEVICE_ACCOUNT, Path(pwd.getpwnam(DEVICE_ACCOUNT).pw_dir), True


def _device_python(account: str, home: Path) -> str:
    """For another account: a script running the system's Python on this checkout and this venv's packages (a
    device where edgepack is installed); for this account, this interpreter."""
    if account == pwd.getpwuid(os.getuid()).pw_name:
        return sys.executable
    import sysconfig

    packages = sysconfig.get_paths()["purelib"]
    source_root = Path(__file__).resolve().parents[1]
    script = home / "python-with-edgepack"
    script.write_text(f'#!/bin/sh\nPYTHONPATH="{packages}:{source_root}" exec {system_python()} "$@"\n')
    script.chmod(0o755)
    return str(script)


@contextmanager
def running_sshd(work: Path) -> Iterator[TestDevice]:
    sshd = sshd_binary()
    assert sshd, "sshd is not installed (Debian: apt-get install openssh-server)"
    account, home, made = _account()
    host_key, client_key = work / "host_key", work / "client_key"
    _keygen(host_key)
    _keygen(client_key)
    if os.geteuid() == 0:
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        authorized = ssh_dir / "authorized_keys"
        authorized.write_text(client_key.with_suffix(".pub").read_text())
        entry = pwd.getpwnam(account)
        for path in (ssh_dir, authorized):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        authorized.chmod(0o600)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        authorized_setting = ".ssh/authorized_keys"
    else:
        authorized = work / "authorized_keys"
        authorized.write_text(client_key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        authorized_setting = str(authorized)
    port = _free_port()
    config = work / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {work / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized_setting}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "UsePAM no", f"AllowUsers {account}", "PrintMotd no",
        "Subsystem sftp internal-sftp", ""]))  # scp speaks SFTP, as Debian's default sshd_config allows
    (work / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key.with_suffix('.pub').read_text()}")
    client_config = work / "ssh_config"
    client_config.write_text("\n".join([
        "Host 127.0.0.1", f"  IdentityFile {client_key}", "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {work / 'known_hosts'}", "  StrictHostKeyChecking yes", "  LogLevel ERROR", ""]))
    log = (work / "sshd.log").open("w")
    server = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"sshd did not start: {(work / 'sshd.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield TestDevice(url=f"ssh://{account}@127.0.0.1:{port}", config=client_config, account=account, home=home,
                         python=_device_python(account, home))
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
        if made:
            subprocess.run(["userdel", "--remove", account], capture_output=True)
