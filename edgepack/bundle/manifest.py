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
    """`text` as a normalised relative POSIX path (no '..', '.', '//', trailing '/', backslash, drive letter or
    control character), or BundleInvalidError naming `where`."""
    path = PurePosixPath(text)
    normalised = bool(path.parts) and path.as_posix() == text and "." not in path.parts
    drive_letter = len(text) > 1 and text[1] == ":"
    if (not normalised or path.is_absolute() or ".." in path.parts or "\\" in text or drive_letter
            or any(ord(c) < 32 or ord(c) == 127 for c in text)):
        raise BundleInvalidError(f"manifest: {where} {text!r} is not a relative path inside the bundle")
    return path


def _check_listed_path(text: Any, where: str, names: set[str], folder_allowed: bool) -> None:
    """A path the manifest names for the server or the variant must be one of its listed files (or, where
    `folder_allowed`, a folder holding some of them): never a file the manifest does not vouch for."""
    if not isinstance(text, str):
        raise BundleInvalidError(f"manifest: {where} has the wrong type ({type(text).__name__})")
    safe_relative_path(text, where)
    in_folder = folder_allowed and any(name.startswith(text + "/") for name in names)
    if text not in names and not in_folder:
        raise BundleInvalidError(f"manifest: {where} {text!r} is not among the bundle's files")


def _check_named_paths(data: dict[str, Any], names: set[str]) -> None:
    """Every path the manifest names besides files[]: the variant, the server's model and chat template, the
    wheels."""
    _check_listed_path(data["variant"]["path"], "variant.path", names, folder_allowed=True)
    _check_listed_path(data["server"]["model_path"], "server.model_path", names, folder_allowed=True)
    if data["server"].get("chat_template") is not None:
        _check_listed_path(data["server"]["chat_template"], "server.chat_template", names, folder_allowed=False)
    wheels = data["wheels"]
    if wheels is None:
        return
    if not isinstance(wheels.get("files"), list) or not isinstance(wheels.get("sources", []), list):
        raise BundleInvalidError("manifest: wheels.files and wheels.sources must be lists")
    for index, name in enumerate(wheels["files"]):
        _check_wheel_file(name, f"wheels.files[{index}]", names)
    for index, source in enumerate(wheels.get("sources", [])):
        _check_wheel_file(source.get("file") if isinstance(source, dict) else None,
                          f"wheels.sources[{index}].file", names)


def _check_wheel_file(name: Any, where: str, names: set[str]) -> None:
    if not isinstance(name, str):
        raise BundleInvalidError(f"manifest: {where} has the wrong type ({type(name).__name__})")
    _check_listed_path(f"wheels/{name}", where, names, folder_allowed=False)


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
    _check_named_paths(data, set(names))
    return files
