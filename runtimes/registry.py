"""Runtime registry: engines are registered under the `edgepack.runtimes` entry-point group; `open_runtime`
picks the one that can load a path."""

from __future__ import annotations

import functools
from importlib import metadata
from pathlib import Path

from edgepack.core.errors import EdgepackError
from runtimes.base import LoadOptions, Runtime

RUNTIME_GROUP = "edgepack.runtimes"


@functools.lru_cache(maxsize=1)
def _load_entry_points() -> tuple[dict[str, type[Runtime]], dict[str, str]]:
    """The engines whose libraries import here, and why each other one does not (a device that installed only
    what serving one bundle needs has one engine)."""
    found, missing = {}, {}
    for entry in metadata.entry_points(group=RUNTIME_GROUP):
        try:
            found[entry.name] = entry.load()
        except ImportError as exc:
            missing[entry.name] = str(exc)
    return found, missing


def runtime_names() -> tuple[str, ...]:
    """Every registered engine's name, whether or not its library imports here (no engine is loaded)."""
    return tuple(entry.name for entry in metadata.entry_points(group=RUNTIME_GROUP))


def runtime_classes() -> dict[str, type[Runtime]]:
    found, missing = _load_entry_points()
    if not found and missing:
        raise EdgepackError("no engine can be loaded here: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    if not found:
        raise EdgepackError("no runtimes are registered: install edgepack (pip install -e .) so its entry points "
                            "exist")
    return found


def open_runtime(path: Path, options: LoadOptions | None = None, engine: str | None = None) -> Runtime:
    """Load `path` on `engine`, or on the engine that recognises what the path is."""
    path = Path(path)
    classes = runtime_classes()
    if engine is not None:
        if engine not in classes:
            unavailable = _load_entry_points()[1]
            if engine in unavailable:
                raise EdgepackError(f"engine {engine!r} is not usable here: {unavailable[engine]} (install its "
                                    "library)")
            raise EdgepackError(f"unknown engine {engine!r}; accepted: {', '.join(classes)}")
        return classes[engine](path, options)
    if not path.exists():
        raise EdgepackError(f"{path} does not exist; expected a .gguf file, an ONNX variant directory or a "
                            "Hugging Face model directory")
    for cls in classes.values():
        if cls.can_load(path):
            return cls(path, options)
    unavailable = _load_entry_points()[1]
    also = f" (engines not usable here: {'; '.join(f'{k}: {v}' for k, v in unavailable.items())})" \
        if unavailable else ""
    raise EdgepackError(f"{path} is not a variant edgepack can run: expected a .gguf file (llamacpp), a directory "
                        f"with model.onnx (onnxrt) or a Hugging Face model directory with safetensors (torch){also}")
