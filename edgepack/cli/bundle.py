"""`edgepack verify`: a bundle against its manifest."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.rendering import print_json
from edgepack.core.artifacts import to_json_dict


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def verify(bundle: Path, as_json: bool) -> None:
    """Check a BUNDLE (directory or .tar.gz): the manifest's schema and every file's size and sha256.
    Exit 7 when it does not check out."""
    from edgepack.bundle import verify_bundle

    report = verify_bundle(bundle)
    if as_json:
        print_json(to_json_dict(report))
        return
    click.echo(f"ok: {report.bundle} ({report.chosen_variant} for {report.target}): {report.files_checked} files, "
               f"{report.bytes_checked / 2**20:.1f} MiB, every sha256 matches the manifest")
