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

from edgepack.bundle.deploy_files import DeployContext, deploy_files
from edgepack.bundle.manifest import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION
from edgepack.bundle.publish import BundleNames, bundle_name_held, publish
from edgepack.bundle.report import render_markdown
from edgepack.core.artifacts import Variant
from edgepack.core.fileio import atomic_output_file, sha256_file
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
    chat_template: str | None = None  # stored as chat_template.jinja and served instead of the model's own
    parallel: int = 1  # generations the server runs at once (each with its own KV cache of `context` tokens)


CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class Bundle:
    directory: Path
    archive: Path
    manifest: dict[str, Any]
    reused: bool  # an identical bundle from an earlier build was already in place and verified


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

    names = BundleNames.in_folder(request.out_dir, request.name)
    manifest_path = names.directory / MANIFEST_NAME
    if not (manifest_path.is_file() and names.archive.is_file() and names.checksum.is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("build_key") != request.build_key:
            return None
        verify_directory(names.directory)
    except (ValueError, BundleInvalidError):
        return None
    if names.checksum.read_text().split()[0] != sha256_file(names.archive):
        return None
    return Bundle(directory=names.directory, archive=names.archive, manifest=manifest, reused=True)


def write_bundle(request: BundleRequest) -> Bundle:
    """Write the bundle and its archive, or reuse an identical one; another build writing the same name into the
    same folder waits for this one (and then finds this bundle, or swaps in its own)."""
    with bundle_name_held(request.out_dir, request.name):
        found = existing_bundle(request)
        if found is not None:
            say(f"bundle {found.directory} is up to date (same inputs, verified)")
            return found
        manifest = publish(request.out_dir, request.name, lambda work: _fill_bundle(request, work))
    names = BundleNames.in_folder(request.out_dir, request.name)
    return Bundle(directory=names.directory, archive=names.archive, manifest=manifest, reused=False)


def _fill_bundle(request: BundleRequest, work: Path) -> dict[str, Any]:
    """Write the bundle's files into `work`, the manifest last; return the manifest."""
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
              "model_path": model_path, "model_id": request.model["name"], "parallel": request.parallel}
    if request.chat_template is not None:
        (work / CHAT_TEMPLATE_FILE).write_text(request.chat_template, encoding="utf-8")
        server["chat_template"] = CHAT_TEMPLATE_FILE
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
    return manifest
