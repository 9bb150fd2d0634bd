"""Converter registry. Each output format is one module registered under the `edgepack.converters` entry-point
group in pyproject.toml; nothing here names a format."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Protocol

from edgepack.artifacts import Variant
from edgepack.errors import EdgepackError

CONVERTER_GROUP = "edgepack.converters"


@dataclass(frozen=True)
class ConvertOptions:
    force: bool = False
    allow_pickle: bool = False
    check_logits: bool = False
    threads: int | None = None
    show_progress: bool = True
    int8_isa: str | None = None  # onnx-int8: avx2, avx512-vnni or arm64; None detects this machine's
    int4_block_size: int = 32  # onnx-int4: weights per quantization block


class Converter(Protocol):
    name: str

    def describe_kinds(self) -> str:
        """A short description of the kinds this converter makes, for error messages and --help."""

    def handles(self, kind: str) -> bool:
        """Whether this converter makes variants of `kind`."""

    def convert(self, model_path: Path, kinds: list[str], out_dir: Path, options: ConvertOptions) -> list[Variant]:
        """Make one variant per kind under `out_dir`."""


@functools.lru_cache(maxsize=1)
def converters() -> tuple[Converter, ...]:
    found = tuple(entry.load() for entry in metadata.entry_points(group=CONVERTER_GROUP))
    if not found:
        raise EdgepackError("no converters are registered: install edgepack (pip install -e .) so its entry "
                            "points exist")
    return found


def converter_for(kind: str) -> Converter:
    for converter in converters():
        if converter.handles(kind):
            return converter
    accepted = "; ".join(converter.describe_kinds() for converter in converters())
    raise EdgepackError(f"unknown variant kind {kind!r}; accepted: {accepted}")
