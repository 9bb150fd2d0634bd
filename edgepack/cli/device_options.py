"""The options that measure on a device over SSH, shared by `edgepack build` and `edgepack profile`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click


def measure_on_options(command: Callable) -> Callable:
    options = [
        click.option("--measure-on", default=None, metavar="ssh://USER@HOST[:PORT]",
                     help="Measure the variants on this device over SSH (the system's ssh/scp, with your keys and "
                          "known_hosts; never a password)."),
        click.option("--ssh-config", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="An ssh_config file for --measure-on (default: your ~/.ssh/config)."),
        click.option("--remote-python", default="python3", show_default=True,
                     help="The device's Python. Without this edgepack version it gets a throwaway venv from an "
                          "offline wheelhouse."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


allow_predicted_option = click.option(
    "--allow-predicted", is_flag=True,
    help="If measuring on the device fails, predict for the target instead of failing.")


def ssh_device(measure_on: str | None, ssh_config: Path | None, remote_python: str, allow_predicted: bool):
    """The SshDevice of --measure-on, or None; the other options are refused without it."""
    from edgepack.core.errors import EdgepackError
    from edgepack.measure.remote import parse_ssh_url

    if measure_on is None:
        if ssh_config is not None or allow_predicted:
            raise EdgepackError("--ssh-config and --allow-predicted go with --measure-on ssh://USER@HOST[:PORT]")
        return None
    return parse_ssh_url(measure_on, config_file=ssh_config, python=remote_python)
