"""A bundle as a .tar.gz: written atomically, and extracted only when every member stays inside the tree."""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from edgepack.bundle.manifest import NOT_SHIPPED_DIRS
from edgepack.core.errors import BundleInvalidError
from edgepack.core.fileio import atomic_output_file

# GGUF and ONNX weights hardly compress; a low level keeps the build fast for the same size within a few percent
COMPRESS_LEVEL = 1


def write_tar_gz(bundle_dir: Path, archive: Path) -> None:
    """`archive` holds `bundle_dir` under its own name, files in sorted order, owners and times normalised."""

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with atomic_output_file(archive) as tmp:
        with tarfile.open(tmp, "w:gz", compresslevel=COMPRESS_LEVEL) as tar:
            root = bundle_dir.name
            tar.add(bundle_dir, arcname=root, recursive=False, filter=normalise)
            for path in sorted(bundle_dir.rglob("*")):
                relative = path.relative_to(bundle_dir)
                if relative.parts[0] in NOT_SHIPPED_DIRS:
                    continue
                tar.add(path, arcname=f"{root}/{relative.as_posix()}", recursive=False, filter=normalise)


def _refuse(member: tarfile.TarInfo, why: str) -> BundleInvalidError:
    return BundleInvalidError(f"refusing to extract the archive: member {member.name!r} {why}; a bundle holds only "
                              "regular files and directories under one top-level folder")


def check_members(members: list[tarfile.TarInfo]) -> str:
    """Every member must be a plain file or directory under one top-level folder; return that folder's name."""
    roots = set()
    for member in members:
        path = PurePosixPath(member.name)
        drive_letter = len(member.name) > 1 and member.name[1] == ":"
        if member.name.startswith(("/", "\\")) or path.is_absolute() or drive_letter:
            raise _refuse(member, "has an absolute path")
        if ".." in path.parts:
            raise _refuse(member, "climbs out of the tree with '..'")
        if member.issym() or member.islnk():
            raise _refuse(member, f"is a link (to {member.linkname!r})")
        if not (member.isfile() or member.isdir()):
            raise _refuse(member, "is a device, a FIFO or another special file")
        roots.add(path.parts[0])
    if len(roots) != 1:
        raise BundleInvalidError(f"the archive must hold one top-level bundle folder; it holds {sorted(roots)}")
    return roots.pop()


@contextlib.contextmanager
def extracted(archive: Path) -> Iterator[Path]:
    """Extract `archive` to a temporary directory after checking every member; yield the bundle folder."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise BundleInvalidError(f"{archive} is not a readable tar archive: {exc}") from exc
    with tar, tempfile.TemporaryDirectory(prefix="edgepack-bundle-") as scratch:
        members = tar.getmembers()
        root = check_members(members)
        for member in members:
            target = Path(scratch, member.name)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            with source, open(target, "wb") as out:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
            os.chmod(target, 0o755 if member.mode & 0o100 else 0o644)
        yield Path(scratch, root)
