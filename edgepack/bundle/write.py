"""The bundle stage: the chosen variant, its report, launchers and deploy files, optional wheels, and the manifest
(written last) in `OUT/<model>-<target>/`, and the same as `OUT/<model>-<target>.tar.gz`."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.bundle.archive import write_tar_gz
from edgepack.bundle.deploy_files import DeployContext, deploy_files
from edgepack.bundle.manifest import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION
from edgepack.bundle.report import render_markdown
from edgepack.core.artifacts import Variant
from edgepack.core.fileio import atomic_output_dir, atomic_output_file, sha256_file
from edgepack.core.progress import say
from edgepack.core.versions import library_versions
from edgepack.measure.targets import TargetProfile

DEFAULT_PORT = 8080
# the device the server asks its engine for, by the target's accelerator (it falls back to the CPU, and says so,
# where the installed engine cannot offload)
SERVE_DEVICE = {"none": "cpu", "cuda": "cuda", "jetson-gpu": "cuda", "metal": "metal"}
BUNDLE_VERSIONS = ("llama-cpp-python", "onnxruntime", "transformers", "gguf", "optimum-onnx", "torch")


@dataclass(frozen=True)
class BundleRequest:
    out_dir: Path
    name: str
    build_key: str
    model: dict[str, Any]  # name, architecture, parameter_count, context_length, fingerprint, ...
    variant: Variant
    engine: str
    target: TargetProfile
    report: dict[str, Any]  # report.json: quality, performance, decision, measurements
    context: int
    threads: int
    offline_wheels: bool


@dataclass(frozen=True)
class Bundle:
    directory: Path
    archive: Path
    manifest: dict[str, Any]
    reused: bool  # an identical bundle from an earlier build was already in place and verified


def bundle_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    return out_dir / name, out_dir / f"{name}.tar.gz"


def _copy_variant(variant: Variant, model_dir: Path) -> str:
    """Copy the variant's files into model/; return the path the server loads, relative to the bundle."""
    model_dir.mkdir()
    if variant.path.is_file():
        shutil.copy2(variant.path, model_dir / variant.path.name)
        return f"model/{variant.path.name}"
    for name in variant.files:
        (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(variant.path / name, model_dir / name)
    return "model"


def _listing(directory: Path) -> list[dict[str, Any]]:
    return [{"path": p.relative_to(directory).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME]


def existing_bundle(request: BundleRequest) -> Bundle | None:
    """An earlier build's bundle with the same build key, still intact (and its archive), or None."""
    from edgepack.bundle.verify import verify_directory
    from edgepack.core.errors import BundleInvalidError

    directory, archive = bundle_paths(request.out_dir, request.name)
    checksum = Path(f"{archive}.sha256")
    manifest_path = directory / MANIFEST_NAME
    if not (manifest_path.is_file() and archive.is_file() and checksum.is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("build_key") != request.build_key:
            return None
        verify_directory(directory)
    except (ValueError, BundleInvalidError):
        return None
    if checksum.read_text().split()[0] != sha256_file(archive):
        return None
    return Bundle(directory=directory, archive=archive, manifest=manifest, reused=True)


def write_bundle(request: BundleRequest) -> Bundle:
    found = existing_bundle(request)
    if found is not None:
        say(f"bundle {found.directory} is up to date (same inputs, verified)")
        return found
    directory, archive = bundle_paths(request.out_dir, request.name)
    for stale in request.out_dir.glob(f".{request.name}*.partial"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    for old in (archive, Path(f"{archive}.sha256")):  # an archive must never outlive the directory it was made from
        old.unlink(missing_ok=True)
    with atomic_output_dir(directory) as work:
        model_path = _copy_variant(request.variant, work / "model")
        wheels = None
        if request.offline_wheels:
            from edgepack.bundle.wheels import download_wheels, install_script

            wheel_set = download_wheels(work / "wheels", request.engine, request.target)
            (work / "install.sh").write_text(install_script(wheel_set))
            os.chmod(work / "install.sh", 0o755)
            wheels = {"platform": wheel_set.platform, "python_version": wheel_set.python_version,
                      "files": list(wheel_set.files), "requirements": list(wheel_set.requirements),
                      "sources": [{"file": s.file, "build_command": s.build_command} for s in wheel_set.sources]}
        server = {"host": "127.0.0.1", "port": DEFAULT_PORT, "context": request.context, "threads": request.threads,
                  "engine": request.engine, "device": SERVE_DEVICE[request.target.accelerator],
                  "model_path": model_path, "model_id": request.model["name"]}
        report = {**request.report, "server": server, "wheels": wheels}
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (work / "report.md").write_text(render_markdown(report))
        context = DeployContext(bundle_name=request.name, model_id=request.model["name"],
                                variant_kind=request.variant.kind, engine=request.engine, model_path=model_path,
                                context=request.context, threads=request.threads, port=DEFAULT_PORT,
                                target=request.target, has_wheels=wheels is not None)
        for relative, (text, executable) in deploy_files(context).items():
            path = work / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, newline="")
            if executable:
                os.chmod(path, 0o755)
        manifest = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "build_key": request.build_key,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": request.model,
            "variant": {"kind": request.variant.kind, "engine": request.engine, "path": model_path,
                        "bytes": request.variant.bytes, "sha256": request.variant.sha256,
                        "converter": request.variant.converter,
                        "library_versions": request.variant.library_versions},
            "target": report["target"], "decision": report["decision"], "quality": report["quality"],
            "performance": report["performance"], "measurements": report["host_measurements"], "server": server,
            "versions": library_versions(BUNDLE_VERSIONS), "files": _listing(work), "wheels": wheels,
        }
        with atomic_output_file(work / MANIFEST_NAME) as tmp:  # last: a bundle without it is incomplete
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"writing {archive}")
    write_tar_gz(directory, archive)
    with atomic_output_file(Path(f"{archive}.sha256")) as tmp:
        tmp.write_text(f"{sha256_file(archive)}  {archive.name}\n")
    return Bundle(directory=directory, archive=archive, manifest=manifest, reused=False)
