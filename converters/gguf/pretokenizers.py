"""Identify a byte-level BPE tokenizer's pre-tokenizer by the name llama.cpp expects in tokenizer.ggml.pre.

llama.cpp does not run a Hugging Face pre-tokenizer; it picks a built-in regex set by name. We rebuild each
named pre-tokenizer with the `tokenizers` library, split a fixed probe text with it, and hash the pieces.
A model's tokenizer is recognised when its own pre-tokenizer splits the probe into exactly the same pieces.
Adding a name is one entry in KNOWN_PRETOKENIZERS (the regexes are those llama.cpp documents for the name).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable

from tokenizers import Regex, Tokenizer, pre_tokenizers

from converters.probe_text import PROBE_TEXT
from edgepack.core.errors import UnsupportedModelError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


KNOWN_PRETOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
    "llama-bpe": lambda: _split_then_bytes(LLAMA3_PATTERN),
    "qwen2": lambda: _split_then_bytes(QWEN2_PATTERN),
}


def split_hash(pre_tokenizer: pre_tokenizers.PreTokenizer) -> str:
    pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(PROBE_TEXT)]
    return hashlib.sha256(json.dumps(pieces, ensure_ascii=False).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def _known_hashes() -> dict[str, str]:
    return {split_hash(build()): name for name, build in KNOWN_PRETOKENIZERS.items()}


def identify_pretokenizer(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or a clear refusal."""
    if tokenizer.pre_tokenizer is None:
        raise UnsupportedModelError("the BPE tokenizer has no pre-tokenizer; llama.cpp's byte-level BPE needs one "
                                    f"of: {', '.join(KNOWN_PRETOKENIZERS)}")
    digest = split_hash(tokenizer.pre_tokenizer)
    name = _known_hashes().get(digest)
    if name is None:
        raise UnsupportedModelError(
            "the tokenizer's pre-tokenizer is not recognised: it splits the probe text unlike every pre-tokenizer "
            f"llama.cpp knows by name that edgepack checks ({', '.join(KNOWN_PRETOKENIZERS)}); split hash "
            f"{digest[:16]}. llama.cpp would tokenize it differently, so the conversion stops here")
    return name


def build_pretokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer for a llama.cpp name (used when rebuilding a tokenizer.json from GGUF)."""
    if name in ("default", "gpt2"):
        name = "gpt-2"
    if name not in KNOWN_PRETOKENIZERS:
        raise UnsupportedModelError(f"GGUF pre-tokenizer {name!r} is not one edgepack can rebuild; "
                                    f"supported: {', '.join(KNOWN_PRETOKENIZERS)}")
    return KNOWN_PRETOKENIZERS[name]()
