"""The `edgepack` command: click only. Each module holds one group of commands (options in, a stage called,
its result rendered by rendering.py); the logic lives in the stages."""

from __future__ import annotations

import click

from edgepack.cli.build import build
from edgepack.cli.bundle import verify
from edgepack.cli.convert import convert, import_gguf
from edgepack.cli.distill import distill
from edgepack.cli.doctor import doctor
from edgepack.cli.inspect import inspect
from edgepack.cli.measure import profile, targets
from edgepack.cli.quality import eval_command
from edgepack.cli.rendering import handles_errors
from edgepack.cli.run import run
from edgepack.cli.serve import route, route_calibrate, serve

COMMANDS = (distill, convert, import_gguf, inspect, run, eval_command, targets, profile, build, verify, serve, route,
            doctor)


@click.group()
@click.version_option(package_name="edgepack")
def main() -> None:
    """Package a small language model for an edge device."""


# every command turns an EdgepackError into its message and exit code (edgepack.core.errors)
for _command in (*COMMANDS, route_calibrate):
    if _command.callback is not None:
        _command.callback = handles_errors(_command.callback)
for _command in COMMANDS:
    main.add_command(_command)

__all__ = ["main"]
