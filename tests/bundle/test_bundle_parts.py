"""Bundle parts without a build: safe extraction of archives, the deploy files per target, which kinds a build
makes for a target, the stage cache."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from edgepack.bundle.archive import check_members, extracted, write_tar_gz
from edgepack.bundle.deploy_files import JETSON_BASE_IMAGE, DeployContext, deploy_files
from edgepack.core.errors import BundleInvalidError, EdgepackError
from edgepack.measure.targets import resolve_target
from edgepack.pipeline.build import variant_kinds
from edgepack.pipeline.stage_cache import StageCache, directory_fingerprint


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize("members, why", [
    ([file_member("/etc/evil")], "has an absolute path"),
    ([file_member("bundle/../../evil")], "climbs out of the tree"),
    ([file_member("bundle/ok"), link_member("bundle/link", "/etc/passwd", tarfile.SYMTYPE)], "is a link"),
    ([file_member("bundle/ok"), link_member("bundle/hard", "../../outside", tarfile.LNKTYPE)], "is a link"),
    ([file_member("bundle/ok"), link_member("bundle/fifo", "", tarfile.FIFOTYPE)], "special file"),
    ([file_member("one/a"), file_member("two/b")], "one top-level bundle folder"),
    ([file_member("bundle/ok"), file_member("bundle/a\\..\\..\\x")], "backslash"),
    ([file_member("bundle/ok"), file_member("bundle/.venv/bin/python")], "inside .venv/"),
])
def test_a_malicious_archive_is_refused_and_nothing_is_written(tmp_path: Path, members, why):
    archive = make_tar(tmp_path / "evil.tar.gz", members)
    before = set(tmp_path.parent.rglob("*"))
    with pytest.raises(BundleInvalidError, match=why):
        with extracted(archive):
            pass
    assert set(tmp_path.parent.rglob("*")) == before


def test_archive_caps_are_checked_on_the_headers_before_anything_is_written(tmp_path: Path):
    """A zip bomb declares its size in the tar headers: refused from those, with nothing extracted."""
    bomb = tarfile.TarInfo("bundle/model.gguf")
    bomb.size = 10**12  # a terabyte that would compress to almost nothing
    with pytest.raises(BundleInvalidError, match="declare 1,000,000,000,000 bytes"):
        check_members([tarfile.TarInfo("bundle"), bomb])
    many = [tarfile.TarInfo(f"bundle/f{index}") for index in range(11)]
    with pytest.raises(BundleInvalidError, match="11 members, more than the 10"):
        check_members(many, max_members=10)
    assert check_members(many) == "bundle"
    sparse = tarfile.TarInfo("bundle/sparse")
    sparse.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(BundleInvalidError, match="sparse"):
        check_members([sparse])


def test_an_archive_round_trips(tmp_path: Path):
    bundle = tmp_path / "b"
    (bundle / "model").mkdir(parents=True)
    (bundle / "model" / "m.gguf").write_bytes(b"weights")
    (bundle / "run.sh").write_text("#!/bin/sh\n")
    (bundle / "run.sh").chmod(0o755)
    (bundle / ".venv").mkdir()  # made by install.sh on the device: not shipped
    (bundle / ".venv" / "junk").write_text("x")
    write_tar_gz(bundle, tmp_path / "b.tar.gz")
    with extracted(tmp_path / "b.tar.gz") as out:
        assert out.name == "b"
        assert (out / "model" / "m.gguf").read_bytes() == b"weights"
        assert (out / "run.sh").stat().st_mode & 0o100
        assert not (out / ".venv").exists()


def context_for(target_name: str, kind: str = "gguf-q8_0", engine: str = "llamacpp") -> DeployContext:
    return DeployContext(bundle_name=f"M-{target_name}", model_id="m", variant_kind=kind, engine=engine,
                         model_path=f"model/{kind}.gguf" if kind.startswith("gguf") else "model", context=4096,
                         threads=6, port=8080, target=resolve_target(target_name), has_wheels=False)


def test_jetson_gets_an_l4t_container_with_cuda_llama_cpp_and_a_memory_cap():
    files = deploy_files(context_for("jetson-orin-nano-8gb"))
    dockerfile = files["deploy/Dockerfile"][0]
    assert f"FROM {JETSON_BASE_IMAGE}" in dockerfile and 'CMAKE_ARGS="-DGGML_CUDA=on"' in dockerfile
    assert "--runtime nvidia" in dockerfile
    assert "docker build -t edgepack-m-jetson-orin-nano-8gb " in dockerfile
    unit = files["deploy/edgepack-M-jetson-orin-nano-8gb.service"][0]
    assert "MemoryMax=5632M" in unit and "ExecStart=/opt/edgepack/M-jetson-orin-nano-8gb/run.sh" in unit
    assert files["deploy/Modelfile"][0].splitlines()[3:5] == ["FROM ../model/gguf-q8_0.gguf", "PARAMETER num_ctx 4096"]
    assert files["run.sh"][1] is True


def test_other_targets_get_a_slim_python_base_and_onnx_has_no_modelfile():
    files = deploy_files(context_for("raspberry-pi-5-8gb", kind="onnx-int8", engine="onnxrt"))
    dockerfile = files["deploy/Dockerfile"][0]
    assert "FROM python:3.11-slim" in dockerfile and "build-essential" not in dockerfile
    assert "deploy/Modelfile" not in files
    assert files["run.bat"][0].count("\r\n") == files["run.bat"][0].count("\n")


def test_build_kinds_follow_formats_and_the_target():
    host = resolve_target("host")
    assert variant_kinds(("gguf",), host) == ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
    assert variant_kinds(("onnx", "gguf-q8_0"), host) == ["onnx-fp32", "onnx-int8", "onnx-int4", "gguf-q8_0"]
    with pytest.raises(EdgepackError, match="'tflite' is not a format or variant kind"):
        variant_kinds(("tflite",), host)
    onnx_only = resolve_target(None, None)
    onnx_only = type(onnx_only)(**{**onnx_only.__dict__, "name": "npu-box", "formats": ("onnx",)})
    with pytest.raises(EdgepackError, match="target npu-box runs onnx only"):
        variant_kinds(("gguf",), onnx_only)


def test_a_cache_entry_exists_whole_or_not_at_all(tmp_path: Path):
    cache = StageCache(tmp_path)

    def fails(directory: Path) -> dict:
        (directory / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.store("stage", "k", fails)
    assert cache.load("stage", "k") is None and not cache.entry("stage", "k").exists()
    record, entry = cache.store("stage", "k", lambda directory: {"n": 1})
    assert cache.load("stage", "k") == {"n": 1} and entry == cache.entry("stage", "k")


def store_file(cache: StageCache, content: bytes, **options: bool) -> tuple[dict, Path]:
    def fill(directory: Path) -> dict:
        (directory / "weights.bin").write_bytes(content)
        return {"path": "weights.bin", "content": content.decode()}

    return cache.store("convert", "k", fill, **options)


def test_a_cache_entry_another_build_may_be_reading_is_kept_not_replaced(tmp_path: Path):
    cache = StageCache(tmp_path)
    first, entry = store_file(cache, b"first")
    with open(entry / "weights.bin", "rb") as reader:  # another build, mid-read
        # a second build that computed the same entry meanwhile keeps the first one and is told what it holds
        second, second_entry = store_file(cache, b"second")
        assert second_entry == entry and second == {"path": "weights.bin", "content": "first"}
        assert (entry / "weights.bin").read_bytes() == b"first" and reader.read() == b"first"
    assert sorted(p.name for p in (tmp_path / "convert").iterdir()) == ["k"]  # the discarded one is gone
    # a forced rebuild replaces it, and so does any build when the entry's record cannot be read
    forced, _ = store_file(cache, b"forced", replace_existing=True)
    assert forced["content"] == "forced" and (entry / "weights.bin").read_bytes() == b"forced"
    (entry / "record.json").write_text('{"path": "weights.b')
    repaired, _ = store_file(cache, b"repaired")
    assert repaired["content"] == "repaired" and (entry / "weights.bin").read_bytes() == b"repaired"
    assert sorted(p.name for p in (tmp_path / "convert").iterdir()) == ["k"]


def test_a_model_file_rewritten_with_its_old_size_and_mtime_is_hashed_again(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "weights.bin"
    weights.write_bytes(b"A" * 64)
    before = directory_fingerprint(model)
    old = weights.stat()
    time.sleep(0.05)  # past the clock tick of the first write, as any real rewrite is
    with open(weights, "r+b") as handle:  # the same file (inode), the same size
        handle.write(b"B" * 64)
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
    new = weights.stat()
    assert (new.st_ino, new.st_size, new.st_mtime_ns) == (old.st_ino, old.st_size, old.st_mtime_ns)
    fresh = tmp_path / "fresh"  # the same content where no hash was ever memoised
    fresh.mkdir()
    (fresh / "weights.bin").write_bytes(b"B" * 64)
    assert directory_fingerprint(model) == directory_fingerprint(fresh) != before
