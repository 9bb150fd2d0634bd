"""Atomic output: a directory that replaces another is never lost on the way."""

from __future__ import annotations

import errno
import os
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
