"""Fixtures of the runtime tests: full-precision variants of the tiny models, opened once per engine."""

from __future__ import annotations

import pytest

from converters.registry import ConvertOptions
from edgepack.convert import convert
from runtimes.base import LoadOptions
from runtimes.registry import open_runtime

QUIET = ConvertOptions(show_progress=False)

@pytest.fixture(scope="module")
def variants(tiny_model, tmp_path_factory):
    """variants(name) -> {engine: path} of the full-precision variants of a tiny model (made once)."""
    root = tmp_path_factory.mktemp("runtime-variants")
    made: dict[str, dict[str, object]] = {}

    def get(name: str) -> dict:
        if name not in made:
            out = root / name
            convert(tiny_model(name), ["gguf-f32", "onnx-fp32"], out, QUIET)
            made[name] = {"torch": tiny_model(name), "onnxrt": out / "onnx-fp32", "llamacpp": out / "gguf-f32.gguf"}
        return made[name]

    return get


@pytest.fixture(scope="module")
def runtimes(variants):
    opened: dict[tuple[str, str], object] = {}

    def get(name: str, engine: str):
        if (name, engine) not in opened:
            opened[(name, engine)] = open_runtime(variants(name)[engine], LoadOptions(context_length=256))
        return opened[(name, engine)]

    yield get
    for runtime in opened.values():
        runtime.close()
