"""Atomic output: a directory that replaces another is never lost on the way; scratch directories of live builds are
never removed by another."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from edgepack.core.fileio import atomic_output_dir


def test_when_the_new_directory_cannot_be_put_in_place_the_old_one_stays(tmp_path: Path, monkeypatch):
    final = tmp_path / "onnx-int8"
    final.mkdir()
    (final / "model.onnx").write_bytes(b"old")

    def failing(rename):
        def wrapper(source, destination, *args, **kwargs):
            if Path(destination) == final and Path(source).name.endswith(".partial"):
                raise OSError(errno.EIO, "input/output error")
            return rename(source, destination, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "rename", failing(os.rename))
    monkeypatch.setattr(os, "replace", failing(os.replace))
    with pytest.raises(OSError, match="input/output error"):
        with atomic_output_dir(final) as work:
            (work / "model.onnx").write_bytes(b"new")
    assert (final / "model.onnx").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["onnx-int8"]


def test_only_scratch_directories_nobody_holds_are_removed(tmp_path):
    import subprocess
    import sys

    from edgepack.core.file_lock import remove_abandoned_scratch_dirs

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from edgepack.core.file_lock import held_scratch_dir\n"
        f"with held_scratch_dir(Path({str(tmp_path)!r}), '.work-') as work:\n"
        "    print(work, flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        held = Path(holder.stdout.readline().strip())
        abandoned, fresh = tmp_path / ".work-gone", tmp_path / ".work-new"
        abandoned.mkdir()
        (abandoned / "half.gguf").write_bytes(b"x")
        fresh.mkdir()
        an_hour_ago = time.time() - 3600
        for old in (held, abandoned):
            os.utime(old, (an_hour_ago, an_hour_ago))
        remove_abandoned_scratch_dirs(tmp_path, ".work-")
        assert held.is_dir()  # its process is alive and holds it, however old it looks
        assert not abandoned.exists()
        assert fresh.is_dir()  # too new to judge: its owner may not have locked it yet
    finally:
        holder.kill()
        holder.wait()
    remove_abandoned_scratch_dirs(tmp_path, ".work-")
    assert not held.exists()  # its holder was killed


def test_a_file_written_atomically_gets_the_mode_of_any_other_new_file(tmp_path):
    import stat

    from edgepack.core.fileio import atomic_output_file

    previous = os.umask(0o022)
    try:
        with atomic_output_file(tmp_path / "edgepack.json") as tmp:
            tmp.write_text("{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(previous)
    modes = {stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("edgepack.json", "plain.json")}
    assert modes == {0o644}  # not mkstemp's 0600: a service user must read the manifest
