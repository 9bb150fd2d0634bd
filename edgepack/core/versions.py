"""Versions of the libraries that made an artifact, recorded in its metadata."""

from __future__ import annotations

from importlib import metadata

EDGEPACK_VERSION = "0.1.0"  # pyproject.toml's version; edgepack.__version__

TRACKED_PACKAGES = ("gguf", "llama-cpp-python", "transformers", "torch", "tokenizers")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def library_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    return {"edgepack": EDGEPACK_VERSION, **{name: package_version(name) for name in names}}
