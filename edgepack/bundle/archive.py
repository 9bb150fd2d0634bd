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
# what a bundle may hold at most: a model of tens of GB, and wheels and files in the thousands
MAX_MEMBERS = 20_000
MAX_TOTAL_BYTES = 128 * 2**30


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


def _too_many(count: str, max_members: int) -> BundleInvalidError:
    return BundleInvalidError(f"refusing to extract the archive: {count} members, more than the {max_members} a "
                              "bundle may hold")


def read_members(tar: tarfile.TarFile, max_members: int = MAX_MEMBERS) -> list[tarfile.TarInfo]:
    """The archive's members, read header by header and refused at the first one past the cap, so that an archive
    of millions of tiny headers costs no more time or memory than the cap's worth."""
    members: list[tarfile.TarInfo] = []
    for member in tar:  # a TarFile reads one header per step when iterated
        if len(members) == max_members:
            raise _too_many(f"{max_members + 1} or more", max_members)
        members.append(member)
    return members


def _check_member(member: tarfile.TarInfo) -> PurePosixPath:
    """One member on its own: a plain file or directory with a relative '/' path; its path."""
    path = PurePosixPath(member.name)
    drive_letter = len(member.name) > 1 and member.name[1] == ":"
    if not path.parts:
        raise _refuse(member, "has an empty name")
    if member.name.startswith(("/", "\\")) or path.is_absolute() or drive_letter:
        raise _refuse(member, "has an absolute path")
    if "\\" in member.name:
        raise _refuse(member, "has a backslash in its name (a Windows path such as a\\..\\x)")
    if ".." in path.parts:
        raise _refuse(member, "climbs out of the tree with '..'")
    if member.issym() or member.islnk():
        raise _refuse(member, f"is a link (to {member.linkname!r})")
    if member.issparse() or member.type == tarfile.GNUTYPE_SPARSE:
        raise _refuse(member, "is a sparse file")
    if not (member.isfile() or member.isdir()):
        raise _refuse(member, "is a device, a FIFO or another special file")
    if len(path.parts) > 1 and path.parts[1] in NOT_SHIPPED_DIRS:
        raise _refuse(member, f"is inside {path.parts[1]}/, which install.sh makes on the device and no "
                              "archive ships")
    if hasattr(tarfile, "data_filter"):
        try:
            tarfile.data_filter(member, "/nonexistent-edgepack-destination")
        except tarfile.FilterError as exc:
            raise _refuse(member, f"fails tarfile's data filter ({exc})") from None
    return path


def _check_one_tree(members: list[tarfile.TarInfo], paths: list[PurePosixPath]) -> None:
    """Each path once, and no file where another member needs a folder: extraction would otherwise keep the last
    of two copies (what was verified need not be what is served) or fail on the clash."""
    seen: set[tuple[str, ...]] = set()
    files = {path.parts for member, path in zip(members, paths, strict=True) if not member.isdir()}
    for member, path in zip(members, paths, strict=True):
        if path.parts in seen:
            raise _refuse(member, "appears twice in the archive")
        seen.add(path.parts)
        clash = next((path.parts[:end] for end in range(1, len(path.parts)) if path.parts[:end] in files), None)
        if clash is not None:
            raise _refuse(member, f"is inside {'/'.join(clash)!r}, which the archive also holds as a file")


def check_members(members: list[tarfile.TarInfo], max_members: int = MAX_MEMBERS,
                  max_bytes: int = MAX_TOTAL_BYTES) -> str:
    """Every member must be a plain file or directory under one top-level folder, named with '/' only and only
    once, none of them a .venv/ (install.sh makes that on the device; no archive ships one) or inside a member
    that is a file, and the archive no bigger than the caps in members and declared bytes (checked on the headers,
    before anything is written); return the folder's name. tarfile's own data filter (Python >= 3.11.4) runs as
    well, for what it checks that this does not."""
    if len(members) > max_members:
        raise _too_many(str(len(members)), max_members)
    declared = sum(member.size for member in members)
    if declared > max_bytes:
        raise BundleInvalidError(f"refusing to extract the archive: its members declare {declared:,} bytes, more "
                                 f"than the {max_bytes:,} a bundle may hold")
    paths = [_check_member(member) for member in members]
    _check_one_tree(members, paths)
    roots = {path.parts[0] for path in paths}
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
        members = read_members(tar, MAX_MEMBERS)
        root = check_members(members, MAX_MEMBERS, MAX_TOTAL_BYTES)
        for member in members:
            target = Path(scratch, member.name)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            with source, open(target, "xb") as out:  # "x": a second copy of a file is never written over the first
                while chunk := source.read(1 << 20):
                    out.write(chunk)
            os.chmod(target, 0o755 if member.mode & 0o100 else 0o644)
        yield Path(scratch, root)
