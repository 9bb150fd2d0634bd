"""Versions of the libraries that made an artifact, recorded in its metadata."""

from __future__ import annotations

from importlib import metadata

import edgepack

TRACKED_PACKAGES = ("gguf", "llama-cpp-python", "transformers", "torch", "tokenizers")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def library_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    return {"edgepack": edgepack.__version__, **{name: package_version(name) for name in names}}
