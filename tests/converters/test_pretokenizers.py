"""Every BPE pre-tokenizer name we know is identified from a tokenizer that uses it, and rebuilt from the name."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models

from converters.gguf.pretokenizers import KNOWN_PRETOKENIZERS, build_pretokenizer, identify_pretokenizer, split_hash


@pytest.mark.parametrize("name", sorted(KNOWN_PRETOKENIZERS))
def test_identify_each_known_pretokenizer(name):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = build_pretokenizer(name)
    assert identify_pretokenizer(tokenizer) == name


def test_known_pretokenizers_split_the_probe_differently():
    hashes = {split_hash(build()) for build in KNOWN_PRETOKENIZERS.values()}
    assert len(hashes) == len(KNOWN_PRETOKENIZERS)


def test_digits_split_as_llama_cpp_names_say():
    pieces = lambda name: [p for p, _ in build_pretokenizer(name).pre_tokenize_str("year 20261")]  # noqa: E731
    assert pieces("gpt-2") == ["year", "Ġ20261"]
    assert pieces("smollm") == ["year", "Ġ", "2", "0", "2", "6", "1"]
    assert pieces("qwen2") == ["year", "Ġ", "2", "0", "2", "6", "1"]
    assert pieces("llama-bpe") == ["year", "Ġ", "202", "61"]
