"""`edgepack doctor`: what works on this machine, and what to do about what does not."""

from __future__ import annotations

import click

from edgepack.cli.rendering import print_json, stdout_console, table
from edgepack.core.artifacts import to_json_dict


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON on stdout.")
def doctor(as_json: bool) -> None:
    """Check this machine: each engine generates from a tiny built-in model (in a child process), the llama.cpp
    build's CPU features and GPU offload, ONNX Runtime's providers, torch, free memory and disk for the cache.
    Exit 0 only when everything the default build needs works."""
    from edgepack.measure.doctor import doctor as run_doctor
    from edgepack.measure.doctor import require_healthy

    report = run_doctor()
    if as_json:
        print_json({**to_json_dict(report), "healthy": report.healthy})
    else:
        stdout_console().print(table("edgepack doctor", ("check", "status", "detail", "what to do"),
                                     [(c.name, c.status.upper() if c.status != "ok" else "ok", c.detail, c.fix)
                                      for c in report.checks]))
    require_healthy(report)
