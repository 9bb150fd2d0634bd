"""Fixtures of the converter tests: the real stories260K model's variants (skipped without ../shared)."""

from __future__ import annotations

import pytest

from converters.registry import ConvertOptions
from edgepack.convert import convert


@pytest.fixture(scope="module")
def stories_variants(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories")
    kinds = ["gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
    return {v.kind: v for v in convert(stories_dir, kinds, out, ConvertOptions(check_logits=True,
                                                                                show_progress=False))}
