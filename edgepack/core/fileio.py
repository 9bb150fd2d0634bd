"""Atomic file output and hashing: nothing half-written ever stays under its final name."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync it and rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)



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
