"""Putting a bundle in place: `OUT/<name>/`, `OUT/<name>.tar.gz` and `OUT/<name>.tar.gz.sha256` change together.

One writer per bundle name at a time holds `OUT/.<name>.lock`. The new bundle and its archive are made in a
staging folder `OUT/.<name>.<random>.partial/`, then swapped in: the old three go into `OUT/.<name>.previous/`
(the checksum first), the new three come in (the checksum last), and the previous ones are deleted. The checksum
is the commit mark: where it exists, the directory and archive beside it belong to it. Whoever takes the lock next
finds what a killed writer left and settles it: an interrupted swap is undone (or finished, once the new
checksum is in), and partials are deleted, since a live writer would still hold the lock.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from edgepack.bundle.archive import write_tar_gz
from edgepack.core.file_lock import exclusive_lock
from edgepack.core.fileio import fsync_dir, fsync_tree, sha256_file
from edgepack.core.progress import say

Result = TypeVar("Result")


@dataclass(frozen=True)
class BundleNames:
    """The three names a bundle has in one folder."""

    directory: Path
    archive: Path
    checksum: Path

    @classmethod
    def in_folder(cls, folder: Path, name: str) -> BundleNames:
        return cls(folder / name, folder / f"{name}.tar.gz", folder / f"{name}.tar.gz.sha256")


def lock_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.lock"


def previous_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.previous"


def _partial_pattern(name: str) -> re.Pattern[str]:
    # a staging folder, and the archive partials older versions wrote straight into OUT; the random part is
    # tempfile's (letters, digits, '_'), so another bundle whose name starts with this one's never matches
    return re.compile(re.escape(f".{name}.") + r"(tar\.gz\.(sha256\.)?)?[a-z0-9_]+\.partial")


@contextlib.contextmanager
def bundle_name_held(out_dir: Path, name: str) -> Iterator[None]:
    """Hold `name` in `out_dir` for the block, after settling what a killed writer of it left behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lock_path(out_dir, name),
                        on_wait=lambda: say(f"waiting for another build that is writing {out_dir / name}")):
        _settle_interrupted_swap(out_dir, name)
        _remove_dead_partials(out_dir, name)
        yield


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _settle_interrupted_swap(out_dir: Path, name: str) -> None:
    previous = previous_path(out_dir, name)
    if not previous.is_dir():
        return
    final = BundleNames.in_folder(out_dir, name)
    if not final.checksum.exists():  # stopped before the new bundle was whole: the old one goes back
        for path in (final.directory, final.archive, final.checksum):
            old = previous / path.name
            if old.exists():
                _remove(path)
                os.rename(old, path)
        fsync_dir(out_dir)
    shutil.rmtree(previous)


def _remove_dead_partials(out_dir: Path, name: str) -> None:
    pattern = _partial_pattern(name)
    for path in out_dir.iterdir():
        if pattern.fullmatch(path.name):
            _remove(path)


def publish(out_dir: Path, name: str, fill: Callable[[Path], Result]) -> Result:
    """`fill(directory)` writes the new bundle; it is archived and swapped in with its archive and checksum.
    Call it inside bundle_name_held(out_dir, name)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out_dir))
    try:
        new = BundleNames.in_folder(staging, name)
        new.directory.mkdir()
        result = fill(new.directory)
        say(f"writing {out_dir / new.archive.name}")
        write_tar_gz(new.directory, new.archive)
        new.checksum.write_text(f"{sha256_file(new.archive)}  {new.archive.name}\n")
        fsync_tree(staging)
        _swap(new, out_dir, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _swap(new: BundleNames, out_dir: Path, name: str) -> None:
    final = BundleNames.in_folder(out_dir, name)
    previous = previous_path(out_dir, name)
    previous.mkdir()
    for path in (final.checksum, final.archive, final.directory):  # the checksum first: the old set is unmarked
        if path.exists() or path.is_symlink():
            os.rename(path, previous / path.name)
    fsync_dir(previous)
    fsync_dir(out_dir)
    for source, target in ((new.directory, final.directory), (new.archive, final.archive),
                           (new.checksum, final.checksum)):  # the checksum last: it marks the new set whole
        os.rename(source, target)
    fsync_dir(out_dir)
    shutil.rmtree(previous)
