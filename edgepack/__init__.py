"""edgepack: package a small language model for an edge device."""

__version__ = "0.1.0"


def load(path, threads=None, context=None):
    """Load a bundle (verified first) or a variant in this process: `.chat(messages)`, `.complete(prompt)`
    (both can stream) and `.serve(port=..., in_thread=True)`. See edgepack.local_model."""
    from edgepack.local_model import load as load_local

    return load_local(path, threads=threads, context=context)
