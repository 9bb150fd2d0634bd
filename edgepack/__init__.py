"""edgepack: package a small language model for an edge device."""

from edgepack.core.versions import EDGEPACK_VERSION as __version__

__all__ = ["__version__", "load"]


def load(path, threads=None, context=None):
    """Load a bundle (verified first) or a variant in this process: `.chat(messages)`, `.complete(prompt)`
    (both can stream) and `.serve(port=..., in_thread=True)`. See edgepack.serve.model."""
    from edgepack.serve.model import load as load_local

    return load_local(path, threads=threads, context=context)
