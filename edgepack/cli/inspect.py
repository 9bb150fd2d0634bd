"""`edgepack inspect`: a Hugging Face model, a GGUF file or a bundle."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.rendering import key_value_table, print_json, stdout_console, table
from edgepack.core.artifacts import to_json_dict


@click.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON on stdout.")
def inspect(model: Path | None, as_json: bool) -> None:
    """Describe a Hugging Face MODEL directory, a GGUF file or a bundle (default: the demo student)."""
    from edgepack.bundle.inspect import is_bundle
    from edgepack.student import resolve_model
    from edgepack.student.inspect import inspect_path, summary_rows

    if model is not None and is_bundle(model):
        _inspect_bundle(model, as_json)
        return
    summary = inspect_path(resolve_model(model))
    if as_json:
        print_json(to_json_dict(summary))
        return
    stdout_console().print(key_value_table(str(summary.path), summary_rows(summary)))


def _inspect_bundle(path: Path, as_json: bool) -> None:
    from edgepack.bundle.inspect import inspect_bundle, require_verified

    summary = inspect_bundle(path)
    if as_json:  # the JSON says whether it verified; the exit code stays 0
        print_json(to_json_dict(summary))
        return
    console = stdout_console()
    model, server = summary.model, summary.server
    console.print(f"bundle {summary.path}: {model.get('name')} ({model.get('architecture')}, "
                  f"{model.get('parameter_count', 0):,} parameters) for {summary.target}", highlight=False)
    console.print("verified: every file matches the manifest" if summary.verified
                  else f"DOES NOT VERIFY: {summary.problem}", highlight=False)
    console.print(f"chosen: {summary.why}", highlight=False)
    for r in summary.rejected:
        console.print(f"  not {r['name']}: {r['reason']} ({r['detail']})", highlight=False)
    console.print(f"server: {server.get('engine')} ({server.get('device')}) on {server.get('model_path')}, "
                  f"context {server.get('context')}, {server.get('threads')} threads, "
                  f"{server.get('host')}:{server.get('port')}", highlight=False)
    console.print(table("files", ("path", "MiB", "sha256"),
                        [(f["path"], f"{f['bytes'] / 2**20:.2f}", f["sha256"][:16]) for f in summary.files]))
    require_verified(summary)
