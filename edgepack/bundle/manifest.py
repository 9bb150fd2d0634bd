"""The bundle manifest (`edgepack.json`): what it holds, and the schema check `edgepack verify` applies to it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from edgepack.core.errors import BundleInvalidError

MANIFEST_NAME = "edgepack.json"
SCHEMA = "edgepack.bundle.write"
SCHEMA_VERSION = 1
# a virtual environment install.sh makes inside the bundle is not part of what was shipped
NOT_SHIPPED_DIRS = (".venv",)


@dataclass(frozen=True)
class BundleFile:
    path: str  # relative, POSIX separators
    bytes: int
    sha256: str


# field -> the type it must have; nested dicts are checked by their own tables
_TOP_LEVEL: dict[str, type | tuple[type, ...]] = {
    "schema": str, "schema_version": int, "build_key": str, "created": str, "model": dict, "variant": dict,
    "target": dict, "decision": dict, "quality": dict, "performance": list, "measurements": dict, "server": dict,
    "versions": dict, "files": list, "wheels": (dict, type(None)),
}
_MODEL = {"name": str, "architecture": str, "parameter_count": int, "context_length": int, "fingerprint": str}
_VARIANT = {"kind": str, "engine": str, "path": str, "bytes": int, "sha256": str}
_SERVER = {"host": str, "port": int, "context": int, "threads": int, "engine": str, "device": str, "model_path": str,
           "model_id": str}
_FILE = {"path": str, "bytes": int, "sha256": str}


def _check_fields(data: Any, table: dict[str, Any], where: str) -> None:
    if not isinstance(data, dict):
        raise BundleInvalidError(f"manifest: {where} must be an object")
    for name, kind in table.items():
        if name not in data:
            raise BundleInvalidError(f"manifest: {where}.{name} is missing")
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise BundleInvalidError(f"manifest: {where}.{name} has the wrong type ({type(value).__name__})")


def safe_relative_path(text: str, where: str) -> PurePosixPath:
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\\" in text:
        raise BundleInvalidError(f"manifest: {where} {text!r} is not a relative path inside the bundle")
    return path


def check_manifest_schema(data: Any) -> list[BundleFile]:
    """Raise BundleInvalidError naming the first thing wrong; return the listed files."""
    _check_fields(data, _TOP_LEVEL, "manifest")
    if data["schema"] != SCHEMA:
        raise BundleInvalidError(f"manifest: schema is {data['schema']!r}, expected {SCHEMA!r}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise BundleInvalidError(f"manifest: schema_version {data['schema_version']} is not supported "
                                 f"(this edgepack reads version {SCHEMA_VERSION})")
    _check_fields(data["model"], _MODEL, "model")
    _check_fields(data["variant"], _VARIANT, "variant")
    _check_fields(data["server"], _SERVER, "server")
    files = []
    for index, entry in enumerate(data["files"]):
        _check_fields(entry, _FILE, f"files[{index}]")
        safe_relative_path(entry["path"], f"files[{index}].path")
        if len(entry["sha256"]) != 64:
            raise BundleInvalidError(f"manifest: files[{index}].sha256 is not a sha256 hex digest")
        files.append(BundleFile(entry["path"], entry["bytes"], entry["sha256"]))
    names = [f.path for f in files]
    if len(set(names)) != len(names):
        raise BundleInvalidError("manifest: a file is listed twice")
    for where in ("variant", "server"):
        key = "path" if where == "variant" else "model_path"
        target = data[where][key]
        safe_relative_path(target, f"{where}.{key}")
        if target not in names and not any(name.startswith(target.rstrip("/") + "/") for name in names):
            raise BundleInvalidError(f"manifest: {where}.{key} {target!r} is not among the bundle's files")
    return files
