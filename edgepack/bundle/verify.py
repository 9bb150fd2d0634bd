"""`edgepack verify`: a bundle (directory or .tar.gz) is what its manifest says, byte for byte."""

from __future__ import annotations

import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.bundle.archive import extracted
from edgepack.bundle.manifest import MANIFEST_NAME, NOT_SHIPPED_DIRS, check_manifest_schema
from edgepack.core.errors import BundleInvalidError
from edgepack.core.fileio import sha256_file


@dataclass(frozen=True)
class VerifyReport:
    bundle: Path
    files_checked: int
    bytes_checked: int
    chosen_variant: str
    target: str


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleInvalidError(f"{bundle_dir} has no {MANIFEST_NAME}: it is not a bundle, or an incomplete one "
                                 "(the manifest is written last)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleInvalidError(f"{path} is not valid JSON: {exc}") from exc


def verify_directory(bundle_dir: Path) -> VerifyReport:
    return _verify_directory(bundle_dir)[0]


def verified_manifest(bundle_dir: Path) -> dict[str, Any]:
    """The manifest of a bundle directory, as verification read and accepted it: every path it names is one of the
    bundle's own files, checked byte for byte (what the server reads from a bundle comes from here)."""
    return _verify_directory(bundle_dir)[1]


def _verify_directory(bundle_dir: Path) -> tuple[VerifyReport, dict[str, Any]]:
    if not bundle_dir.is_dir():
        raise BundleInvalidError(f"{bundle_dir} is not a directory")
    manifest = read_manifest(bundle_dir)
    files = check_manifest_schema(manifest)
    listed = {f.path for f in files}
    root = bundle_dir.resolve()
    for f in files:
        path = bundle_dir / f.path
        if path.is_symlink() or not path.is_file():
            raise BundleInvalidError(f"{f.path} is listed in the manifest but missing from the bundle")
        if path.resolve() != root.joinpath(*f.path.split("/")):
            raise BundleInvalidError(f"{f.path} is reached through a symbolic link: a bundle holds only its own "
                                     "files and folders")
        size = path.stat().st_size
        if size != f.bytes:
            raise BundleInvalidError(f"{f.path}: {size} bytes, the manifest says {f.bytes}")
        if sha256_file(path) != f.sha256:
            raise BundleInvalidError(f"{f.path}: sha256 differs from the manifest's (the file was changed)")
    for path in sorted(bundle_dir.rglob("*")):
        relative = path.relative_to(bundle_dir)
        if relative.parts[0] in NOT_SHIPPED_DIRS or path.is_dir() and not path.is_symlink():
            continue
        name = relative.as_posix()
        if name != MANIFEST_NAME and name not in listed:
            raise BundleInvalidError(f"{name} is in the bundle but not in its manifest (an added or renamed file)")
    report = VerifyReport(bundle=bundle_dir, files_checked=len(files), bytes_checked=sum(f.bytes for f in files),
                          chosen_variant=manifest["variant"]["kind"], target=manifest["target"].get("name", "?"))
    return report, manifest


def verify_bundle(path: Path) -> VerifyReport:
    """Check a bundle directory, or a .tar.gz of one (extracted safely to a temporary directory first)."""
    path = Path(path)
    if not path.exists():
        raise BundleInvalidError(f"{path} does not exist; expected a bundle directory or its .tar.gz")
    if path.is_dir():
        return verify_directory(path)
    try:
        with extracted(path) as bundle_dir:
            report = verify_directory(bundle_dir)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise BundleInvalidError(f"{path} is a damaged archive: {exc}") from exc
    return VerifyReport(bundle=path, files_checked=report.files_checked, bytes_checked=report.bytes_checked,
                        chosen_variant=report.chosen_variant, target=report.target)
