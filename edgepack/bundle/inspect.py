"""`edgepack inspect BUNDLE`: what a bundle holds and why its variant was chosen."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.bundle.archive import extracted
from edgepack.bundle.manifest import MANIFEST_NAME
from edgepack.bundle.verify import read_manifest, verify_directory
from edgepack.core.errors import BundleInvalidError


@dataclass(frozen=True)
class BundleSummary:
    path: Path
    verified: bool
    problem: str | None  # why verification failed
    model: dict[str, Any]
    target: str
    chosen: str
    why: str
    rejected: tuple[dict[str, str], ...]
    server: dict[str, Any]
    files: tuple[dict[str, Any], ...]


def is_bundle(path: Path) -> bool:
    path = Path(path)
    return (path / MANIFEST_NAME).is_file() or path.is_file() and path.name.endswith((".tar.gz", ".tgz"))


@contextlib.contextmanager
def bundle_directory(path: Path) -> Iterator[Path]:
    """The bundle's directory: `path` itself, or a safe extraction of a .tar.gz."""
    if Path(path).is_dir():
        yield Path(path)
    else:
        with extracted(Path(path)) as directory:
            yield directory


def inspect_bundle(path: Path) -> BundleSummary:
    with bundle_directory(path) as directory:
        manifest = read_manifest(directory)
        try:
            verify_directory(directory)
            problem = None
        except BundleInvalidError as exc:
            problem = str(exc)
    decision = manifest.get("decision", {})
    return BundleSummary(path=Path(path), verified=problem is None, problem=problem, model=manifest.get("model", {}),
                         target=manifest.get("target", {}).get("name", "?"), chosen=decision.get("chosen", "?"),
                         why=decision.get("why", ""), rejected=tuple(decision.get("rejected", [])),
                         server=manifest.get("server", {}), files=tuple(manifest.get("files", [])))


def require_verified(summary: BundleSummary) -> None:
    """Raise BundleInvalidError (exit 7) for a bundle that did not verify, after it was described."""
    if not summary.verified:
        raise BundleInvalidError(f"{summary.path} does not verify: {summary.problem}")
