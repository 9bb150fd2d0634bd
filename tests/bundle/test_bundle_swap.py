"""Writing a bundle where other builds write the same name into the same folder, and after a build was killed
between taking the old bundle away and putting the new one in. The writers are forked processes running the real
write_bundle on a tiny variant; a pause or a kill is injected at one point of the real code path."""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import signal
import tarfile
from pathlib import Path

import pytest

import edgepack.bundle.write as bundle_write
from edgepack.bundle.verify import verify_bundle, verify_directory
from edgepack.bundle.write import BundleRequest, write_bundle
from edgepack.core.artifacts import Variant, to_json_dict
from edgepack.measure.targets import TargetProfile, resolve_target

FORK = multiprocessing.get_context("fork")
TARGET = "raspberry-pi-5-8gb"
NAME = f"tiny-{TARGET}"
KIND = "gguf-q8_0"


@functools.cache
def target_profile() -> TargetProfile:
    return resolve_target(TARGET)


def tiny_request(out_dir: Path, variant_file: Path, build_key: str) -> BundleRequest:
    """A bundle request for a small variant file, with a report of one variant that passed and was chosen."""
    target = target_profile()
    data = variant_file.read_bytes()
    variant = Variant(kind=KIND, path=variant_file, files=(variant_file.name,), bytes=len(data),
                      sha256=hashlib.sha256(data).hexdigest(), converter="test bytes")
    model = {"name": "tiny", "architecture": "llama", "parameter_count": 1000, "context_length": 64,
             "fingerprint": "0" * 64}
    report = {
        "model": model, "target": to_json_dict(target), "context": 64, "build_host": "the test machine",
        "quality": {"gate": {"max_ppl_increase": 0.1, "max_kld": 0.1}, "reference_perplexity": 9.5,
                    "positions_scored": 31, "window": 64, "top_k_stored": 32, "outside_top_k_mass": 0.004,
                    "crashed": [],
                    "variants": [{"name": KIND, "ppl_ratio": 1.01, "kld_mean": 0.01, "same_top1": 0.95,
                                  "ppl_ratio_ci": [1.0, 1.02], "kld_mean_ci": [0.008, 0.012], "passed": True}]},
        "performance": [{"variant": KIND, "engine": "llamacpp", "memory_bytes": 2**20, "decode_tps": 50.0,
                         "basis": "measured"}],
        "host_measurements": {"memory_bandwidth_gbps": 10.0, "variants": [], "notes": []},
        "decision": {"chosen": KIND, "why": "the only variant", "rejected": []},
        "variant_bytes": {KIND: len(data)},
    }
    return BundleRequest(out_dir=out_dir, name=NAME, build_key=build_key, model=model, variant=variant,
                         engine="llamacpp", target=target, report=report, context=64, threads=4,
                         offline_wheels=False)


@pytest.fixture()
def variant_file(tmp_path: Path) -> Path:
    path = tmp_path / f"{KIND}.gguf"
    path.write_bytes(os.urandom(1 << 16))
    return path


def assert_one_whole_bundle(out: Path, build_key: str) -> None:
    """OUT holds the bundle of `build_key`, its archive made from that directory, the archive's checksum, and
    nothing else but the lock file."""
    directory, archive, checksum = out / NAME, out / f"{NAME}.tar.gz", out / f"{NAME}.tar.gz.sha256"
    verify_directory(directory)
    manifest = (directory / "edgepack.json").read_bytes()
    assert json.loads(manifest)["build_key"] == build_key
    assert checksum.read_text() == f"{hashlib.sha256(archive.read_bytes()).hexdigest()}  {archive.name}\n"
    with tarfile.open(archive) as tar:
        assert tar.extractfile(f"{NAME}/edgepack.json").read() == manifest
    verify_bundle(archive)
    assert sorted(p.name for p in out.iterdir()) == sorted([NAME, archive.name, checksum.name, f".{NAME}.lock"])


def write_pausing_before_the_copy(request: BundleRequest, paused, resume) -> None:
    """write_bundle, stopping (with its partial output begun) until `resume` is set."""
    copy_variant = bundle_write._copy_variant

    def pausing(variant, model_dir):
        paused.set()
        resume.wait(30)
        return copy_variant(variant, model_dir)

    bundle_write._copy_variant = pausing
    write_bundle(request)


def test_two_builds_writing_one_bundle_at_once_both_finish_with_a_bundle_that_verifies(tmp_path, variant_file):
    out = tmp_path / "dist"
    paused, resume = FORK.Event(), FORK.Event()
    first = FORK.Process(target=write_pausing_before_the_copy,
                         args=(tiny_request(out, variant_file, "first"), paused, resume))
    first.start()
    assert paused.wait(30)
    second = FORK.Process(target=write_bundle, args=(tiny_request(out, variant_file, "second"),))
    second.start()
    second.join(0.5)
    still_waiting = second.is_alive()  # the first build's partial output is not its to delete; it waits its turn
    resume.set()
    first.join(30)
    second.join(30)
    assert (first.exitcode, second.exitcode) == (0, 0)
    assert still_waiting
    assert_one_whole_bundle(out, "second")


def write_killed_at_rename_onto(request: BundleRequest, final: Path) -> None:
    """write_bundle, killed (SIGKILL, no clean-up) just before it renames anything onto `final`."""
    def killing(rename):
        def wrapper(source, destination, *args, **kwargs):
            if Path(destination) == final:
                os.kill(os.getpid(), signal.SIGKILL)
            return rename(source, destination, *args, **kwargs)
        return wrapper

    os.rename, os.replace = killing(os.rename), killing(os.replace)
    write_bundle(request)


@pytest.mark.parametrize("final_name", [NAME, f"{NAME}.tar.gz.sha256"],
                         ids=["before-the-new-directory-moves-in", "before-the-new-checksum-moves-in"])
def test_a_build_killed_while_replacing_a_bundle_loses_neither(tmp_path, variant_file, final_name):
    out = tmp_path / "dist"
    assert write_bundle(tiny_request(out, variant_file, "old")).reused is False
    killed = FORK.Process(target=write_killed_at_rename_onto,
                          args=(tiny_request(out, variant_file, "new"), out / final_name))
    killed.start()
    killed.join(30)
    assert killed.exitcode == -signal.SIGKILL
    # the next build finds the old bundle whole again: the same inputs reuse it
    again = write_bundle(tiny_request(out, variant_file, "old"))
    assert again.reused is True
    assert_one_whole_bundle(out, "old")
    assert write_bundle(tiny_request(out, variant_file, "new")).reused is False
    assert_one_whole_bundle(out, "new")


def test_only_this_bundles_abandoned_partials_are_removed(tmp_path, variant_file):
    out = tmp_path / "dist"
    out.mkdir()
    abandoned = out / f".{NAME}.k2j4x9_a.partial"  # a staging folder of a writer that was killed
    (abandoned / NAME).mkdir(parents=True)
    old_archive_partial = out / f".{NAME}.tar.gz.q8w3e1rt.partial"  # how earlier versions wrote the archive
    old_archive_partial.write_bytes(b"half an archive")
    others = [out / f".{NAME}-cuda.p0o9i8u7.partial", out / f".{NAME}.v2.a1b2c3d4.partial"]  # other bundles'
    for path in others:
        path.mkdir()
    write_bundle(tiny_request(out, variant_file, "k"))
    assert not abandoned.exists() and not old_archive_partial.exists()
    assert all(path.is_dir() for path in others)
