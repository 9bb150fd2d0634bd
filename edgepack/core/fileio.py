"""Atomic file output and hashing: nothing half-written ever stays under its final name."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgepack.core.errors import EdgepackError


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise EdgepackError(f"{path} already exists; pass --force to overwrite it")


def file_identity(path: Path) -> str:
    """What changes whenever a file's content may have: size, mtime, inode and ctime. The ctime cannot be set by a
    user (os.utime sets it to now), so a file rewritten with the same size and its old mtime restored still shows."""
    stat = path.stat()
    return f"{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, so that a rename that publishes it never exposes unwritten data."""
    for child in root.rglob("*"):
        if child.is_file() and not child.is_symlink():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())


def _umask() -> int:
    """This process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync it and rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would keep a service user from reading a shipped file
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(final: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success put it in place whole.

    An existing `final` is replaced: renamed aside first and deleted only once the new one is in place (a crash in
    between leaves it as `.<name>.<random>.aside`). With `keep_existing` (a cache, whose entries another process
    may be reading), an existing `final` is kept and the new directory discarded: the first writer wins."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if keep_existing:
            _rename_unless_present(tmp, final)
        else:
            _replace_dir(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# rename(2) of a directory onto a non-empty one fails with one of these (Linux: ENOTEMPTY, some systems: EEXIST)
_TARGET_NOT_EMPTY = (errno.ENOTEMPTY, errno.EEXIST)


def _rename_unless_present(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` unless another writer's `final` is already there (then `tmp` stays, to be removed)."""
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in _TARGET_NOT_EMPTY:
            raise


def _replace_dir(tmp: Path, final: Path) -> None:
    aside = None
    if final.exists():
        # mkdtemp reserves a unique name; renaming a directory onto an empty one replaces it
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".aside", dir=final.parent))
        try:
            os.rename(final, aside)
        except FileNotFoundError:  # another writer moved it aside first
            aside.rmdir()
            aside = None
    try:
        os.rename(tmp, final)
    except OSError as exc:
        # another writer's new directory went in between our two renames: it is as new as ours, so it stays
        if exc.errno not in _TARGET_NOT_EMPTY:
            if aside is not None and not final.exists():
                os.rename(aside, final)
            raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def safe_name_problem(value: str) -> str | None:
    """Why `value` cannot be part of generated file names, unit names, image tags and shell lines; None if it can."""
    if not SAFE_NAME.fullmatch(value) or ".." in value:
        return ("cannot name generated files; accepted: 1 to 128 letters, digits and . _ + - starting with a letter "
                "or digit, without '..'")
    return None


def one_line_problem(value: str) -> str | None:
    """Why free text cannot go on one line of a generated file (a comment, a description); None if it can."""
    if CONTROL_CHARACTERS.search(value):
        return "contains a newline or another control character; give one line of plain text"
    return None


def check_safe_name(value: str, what: str) -> str:
    problem = safe_name_problem(value)
    if problem:
        raise EdgepackError(f"{what} {value!r} {problem}")
    return value


def read_jsonl(path: Path, what: str) -> list[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSON Lines file; a clear error naming `what` for a missing
    file, and the line for one that is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise EdgepackError(f"{what} {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except ValueError as exc:
            raise EdgepackError(f"{path}:{number}: not JSON: {exc}") from exc
    return rows
