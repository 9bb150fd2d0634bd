"""Fixtures of the measure tests: a tiny llama's variants to profile and to predict from."""

from __future__ import annotations

import pytest

from converters.registry import ConvertOptions
from edgepack.convert import convert

QUIET = ConvertOptions(show_progress=False)

@pytest.fixture(scope="module")
def tiny_variants(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("profiled")
    made = convert(tiny_model("llama-bpe"), ["gguf-f16", "gguf-q8_0", "onnx-fp32"], out, QUIET)
    return {v.kind: v.path for v in made}
