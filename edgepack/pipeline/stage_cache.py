"""The build's stage cache: each stage's output stored under a key that hashes everything it depends on.

A key is the sha256 of the stage name, its inputs (content hashes of files, options) and the versions of the
libraries that make it. An entry is a directory holding `record.json` (the stage's typed output as JSON) and
any files the stage made. Entries are written to a temporary directory and renamed into place, so an entry
either exists whole or not at all: a build killed mid-stage resumes from the last finished entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.core.fileio import atomic_output_dir, sha256_file

RECORD = "record.json"


def digest_of(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def directory_fingerprint(path: Path) -> str:
    """A content hash of a model directory (or a file): every file's relative name and sha256.

    Hidden files (our own markers) are left out. File hashes are memoised by (size, mtime) in the cache, so a
    re-run does not read hundreds of MB again."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    entries = [(p.name if path.is_file() else p.relative_to(path).as_posix(), _memoised_sha256(p)) for p in files]
    return digest_of(entries)


_MEMO_FILE = "file-hashes.json"


def _memoised_sha256(path: Path) -> str:
    from edgepack.core.cache import cache_root

    memo_path = cache_root() / _MEMO_FILE
    stat = path.stat()
    token = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if token in memo:
        return memo[token]
    digest = sha256_file(path)
    memo[token] = digest
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, memo_path)
    return digest


@dataclass(frozen=True)
class StageCache:
    """Entries live in root/<stage>/<key>/."""

    root: Path

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> dict[str, Any] | None:
        record = self.entry(stage, key) / RECORD
        if not record.is_file():
            return None
        try:
            return json.loads(record.read_text())
        except ValueError:
            return None

    def store(self, stage: str, key: str, fill: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], Path]:
        """Run `fill(directory)`, which writes the stage's files there and returns its record; keep it as a whole.

        The record may name files by their path inside the directory; after the rename they are under entry()."""
        final = self.entry(stage, key)
        with atomic_output_dir(final) as work:
            record = fill(work)
            (work / RECORD).write_text(json.dumps(record, indent=1, default=str))
        return record, final
