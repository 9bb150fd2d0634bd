"""Fixtures of the quality tests: a tiny qwen3's full-precision and quantized variants."""

from __future__ import annotations

import pytest

from converters.registry import ConvertOptions
from edgepack.convert import convert

QUIET = ConvertOptions(show_progress=False)

@pytest.fixture(scope="module")
def tiny_variants(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality-variants")
    made = convert(tiny_model("qwen3-bpe"), ["gguf-f32", "gguf-q4_k_m", "onnx-fp32", "onnx-int4"], out, QUIET)
    return {v.kind: v.path for v in made}
