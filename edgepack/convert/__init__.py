"""Stage 1, convert: a Hugging Face model directory -> one Variant per kind, through the converter registry."""

from converters.registry import ConvertOptions
from edgepack.convert.stage import convert, parse_kinds

__all__ = ["ConvertOptions", "convert", "parse_kinds"]
