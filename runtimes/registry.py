"""Runtime registry: engines are registered under the `edgepack.runtimes` entry-point group; `open_runtime`
picks the one that can load a path."""

from __future__ import annotations

import functools
from importlib import metadata
from pathlib import Path

from edgepack.core.errors import EdgepackError
from runtimes.base import LoadOptions, Runtime

RUNTIME_GROUP = "edgepack.runtimes"


@functools.cache
def _load_engine(name: str) -> type[Runtime] | str:
    """The engine registered as `name`, or why its library does not import here (a device that installed only what
    serving one bundle needs has one engine). Engines load one at a time, on demand: finding the engine for a
    .gguf file does not import torch."""
    (entry,) = [entry for entry in metadata.entry_points(group=RUNTIME_GROUP) if entry.name == name][:1] or [None]
    if entry is None:
        return f"no engine is registered as {name!r}"
    try:
        return entry.load()
    except ImportError as exc:
        return str(exc)


def _load_entry_points() -> tuple[dict[str, type[Runtime]], dict[str, str]]:
    """Every registered engine loaded: the usable ones, and why each other one is not."""
    found, missing = {}, {}
    for name in runtime_names():
        loaded = _load_engine(name)
        if isinstance(loaded, str):
            missing[name] = loaded
        else:
            found[name] = loaded
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


def engine_supports_device(engine: str, device: str) -> bool:
    """Whether the installed `engine` can run a model on `device`; False for an engine that does not load here."""
    cls = _load_engine(engine)
    try:
        return not isinstance(cls, str) and cls.supports_device(device)
    except ImportError:  # the engine's module loads without its library, which this device does not have
        return False


def open_runtime(path: Path, options: LoadOptions | None = None, engine: str | None = None) -> Runtime:
    """Load `path` on `engine`, or on the engine that recognises what the path is."""
    path = Path(path)
    names = runtime_names()
    if not names:
        runtime_classes()  # says that nothing is registered
    if engine is not None:
        if engine not in names:
            raise EdgepackError(f"unknown engine {engine!r}; accepted: {', '.join(names)}")
        cls = _load_engine(engine)
        if isinstance(cls, str):
            raise EdgepackError(f"engine {engine!r} is not usable here: {cls} (install its library)")
        return cls(path, options)
    if not path.exists():
        raise EdgepackError(f"{path} does not exist; expected a .gguf file, an ONNX variant directory or a "
                            "Hugging Face model directory")
    for name in runtime_names():  # in registration order, loading each only when the ones before it declined
        cls = _load_engine(name)
        if not isinstance(cls, str) and cls.can_load(path):
            return cls(path, options)
    unavailable = _load_entry_points()[1]
    also = f" (engines not usable here: {'; '.join(f'{k}: {v}' for k, v in unavailable.items())})" \
        if unavailable else ""
    raise EdgepackError(f"{path} is not a variant edgepack can run: expected a .gguf file (llamacpp), a directory "
                        f"with model.onnx (onnxrt) or a Hugging Face model directory with safetensors (torch){also}")
