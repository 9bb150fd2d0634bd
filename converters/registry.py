"""Converter registry. Each output format is one module registered under the `edgepack.converters` entry-point
group in pyproject.toml, under its format's name, and declares everything about itself once: its kinds, its
default kinds, the options that change its output (and so enter the build cache's key) and the engines that run
it. Nothing else in edgepack names a format."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Protocol

from edgepack.core.artifacts import Variant
from edgepack.core.cpu import Int8Isa
from edgepack.core.errors import EdgepackError

CONVERTER_GROUP = "edgepack.converters"


@dataclass(frozen=True)
class ConvertOptions:
    force: bool = False
    allow_pickle: bool = False
    check_logits: bool = False
    threads: int | None = None
    show_progress: bool = True
    int8_isa: Int8Isa | None = None  # onnx-int8: the target's integer kernels; None detects this machine's
    int4_block_size: int = 32  # onnx-int4: weights per quantization block
    imatrix: bool = True  # gguf quantized kinds: weight the rounding by an importance matrix computed here
    calibration_text: str | None = None  # the text the importance matrix is computed on; None: the built-in one


class Converter(Protocol):
    name: ClassVar[str]  # the format: the first part of its kinds ("gguf" for gguf-q8_0)
    default_kinds: ClassVar[tuple[str, ...]]  # what `edgepack build --formats NAME` makes
    engines: ClassVar[tuple[str, ...]]  # the runtimes (by registry name) that run its variants

    def describe_kinds(self) -> str:
        """A short description of the kinds this converter makes, for error messages and --help."""

    def handles(self, kind: str) -> bool:
        """Whether this converter makes variants of `kind`."""

    def cache_options(self, kind: str, options: ConvertOptions) -> dict[str, Any]:
        """The options that change what `kind` comes out as (the build cache keys on them)."""

    def convert(self, model_path: Path, kinds: list[str], out_dir: Path, options: ConvertOptions) -> list[Variant]:
        """Make one variant per kind under `out_dir`."""


@functools.lru_cache(maxsize=1)
def _load_entry_points() -> tuple[tuple[Converter, ...], dict[str, str]]:
    """The converters whose libraries import here, and why each other one does not (a device that installed only
    what serving a bundle needs converts nothing)."""
    found, missing = [], {}
    for entry in metadata.entry_points(group=CONVERTER_GROUP):
        try:
            found.append(entry.load())
        except ImportError as exc:
            missing[entry.name] = str(exc)
    return tuple(found), missing


def converters() -> tuple[Converter, ...]:
    """The converters usable here; an error that says why when there is none."""
    found, missing = _load_entry_points()
    if not found and missing:
        raise EdgepackError("no converter can be loaded here: " + "; ".join(f"{k}: {v}" for k, v in missing.items())
                            + " (install edgepack with its conversion dependencies: pip install edgepack)")
    if not found:
        raise EdgepackError("no converters are registered: install edgepack (pip install -e .) so its entry "
                            "points exist")
    return found


def usable_converters() -> tuple[Converter, ...]:
    """The converters usable here, possibly none (a device that only serves)."""
    return _load_entry_points()[0]


def formats() -> tuple[str, ...]:
    """The registered formats, e.g. ("gguf", "onnx"): the entry points' names, read without importing them."""
    return tuple(dict.fromkeys(entry.name for entry in metadata.entry_points(group=CONVERTER_GROUP)))


def converter_for(kind: str) -> Converter:
    for converter in converters():
        if converter.handles(kind):
            return converter
    accepted = "; ".join(converter.describe_kinds() for converter in converters())
    raise EdgepackError(f"unknown variant kind {kind!r}; accepted: {accepted}")

