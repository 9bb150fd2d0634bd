"""The build's stage cache: each stage's output stored under a key that hashes everything it depends on.

A key is the sha256 of the stage name, its inputs (content hashes of files, options) and the versions of the
libraries that make it. An entry is a directory holding `record.json` (the stage's typed output as JSON) and
any files the stage made. Entries are written to a temporary directory and renamed into place, so an entry
either exists whole or not at all: a build killed mid-stage resumes from the last finished entry. An entry in place
is never deleted by a build that computed the same one meanwhile (another build may be reading it); only a forced
rebuild replaces it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.core.cache import digest_of
from edgepack.core.fileio import atomic_output_dir, atomic_output_file, file_identity, sha256_file

RECORD = "record.json"


def directory_fingerprint(path: Path) -> str:
    """A content hash of a model directory (or a file): every file's relative name and sha256.

    Hidden files (our own markers) are left out. File hashes are memoised by path and file_identity (size, mtime,
    inode, ctime) in the cache, so a re-run does not read hundreds of MB again."""
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
    """The file's sha256, from the memo when its path and identity are unchanged. The memo maps a resolved path to
    {"identity", "sha256"}; builds that write it at once may lose each other's additions (they are recomputed),
    never corrupt it: it is replaced whole."""
    from edgepack.core.cache import cache_root

    memo_path = cache_root() / _MEMO_FILE
    key, identity = str(path.resolve()), file_identity(path)
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    known = memo.get(key)
    if isinstance(known, dict) and known.get("identity") == identity:
        return known["sha256"]
    digest = sha256_file(path)
    memo = {k: v for k, v in memo.items() if isinstance(v, dict)}  # entries of the older path|size|mtime format go
    memo[key] = {"identity": identity, "sha256": digest}
    with atomic_output_file(memo_path) as tmp:
        tmp.write_text(json.dumps(memo))
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

    def store(self, stage: str, key: str, fill: Callable[[Path], dict[str, Any]],
              replace_existing: bool = False) -> tuple[dict[str, Any], Path]:
        """Run `fill(directory)`, which writes the stage's files there and returns its record; keep it as a whole.

        The record may name files by their path inside the directory; after the rename they are under entry().
        An entry that is already there (another build stored it meanwhile, and may be reading it) is kept and what
        this call made is discarded; the record returned is the one in place. `replace_existing` (a forced
        rebuild) replaces it instead, as does storing over an entry whose record cannot be read."""
        final = self.entry(stage, key)
        broken = final.exists() and self.load(stage, key) is None
        with atomic_output_dir(final, keep_existing=not (replace_existing or broken)) as work:
            record = fill(work)
            (work / RECORD).write_text(json.dumps(record, indent=1, default=str))
        in_place = self.load(stage, key)  # None only while a forced rebuild swaps it in: its files are named as ours
        return (record if in_place is None else in_place), final
