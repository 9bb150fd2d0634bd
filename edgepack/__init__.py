"""edgepack: package a small language model for an edge device."""

__version__ = "0.1.0"
