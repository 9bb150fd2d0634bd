"""`edgepack build`: every stage in order, each cached by content hash."""

from edgepack.pipeline.build import build

__all__ = ["build"]
