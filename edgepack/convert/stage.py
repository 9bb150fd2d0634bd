"""The convert stage: a Hugging Face model directory -> one variant per requested kind."""

from __future__ import annotations

from pathlib import Path

from converters.registry import ConvertOptions, converter_for
from edgepack.core.artifacts import Variant
from edgepack.core.errors import EdgepackError


def parse_kinds(text: str) -> list[str]:
    kinds = [kind.strip().lower() for kind in text.split(",") if kind.strip()]
    if not kinds:
        raise EdgepackError("no variant kinds given; e.g. --to gguf-f16,gguf-q8_0,gguf-q4_k_m")
    return list(dict.fromkeys(kinds))


def convert(model_path: Path, kinds: list[str], out_dir: Path, options: ConvertOptions | None = None
            ) -> list[Variant]:
    """Convert `model_path` to every kind in `kinds`, grouped by the converter that makes each."""
    options = options or ConvertOptions()
    groups: dict[int, tuple[object, list[str]]] = {}
    for kind in kinds:
        converter = converter_for(kind)
        groups.setdefault(id(converter), (converter, []))[1].append(kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants: list[Variant] = []
    for converter, group in groups.values():
        variants.extend(converter.convert(Path(model_path), group, out_dir, options))  # type: ignore[attr-defined]
    order = {kind: index for index, kind in enumerate(kinds)}
    return sorted(variants, key=lambda variant: order[variant.kind])
