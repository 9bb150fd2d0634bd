"""Stage 6, serve: the OpenAI-compatible server over a bundle or variant, hybrid routing to an upstream model,
and `edgepack.load`'s in-process model."""

from edgepack.serve.app import serve_path
from edgepack.serve.model import load

__all__ = ["load", "serve_path"]
