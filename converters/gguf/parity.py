"""Parity checks run on every conversion: the GGUF must tokenize (and, in F32, compute) like the original.

The logit check is the one every format shares (converters.logit_parity.check_logit_parity)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from converters.logit_parity import LogitParity, check_logit_parity
from converters.probe_text import PROBE_MESSAGES, PROBE_TEXT
from edgepack.core.errors import ParityError
from runtimes import llamacpp


@dataclass(frozen=True)
class TokenizerParity:
    texts_checked: int
    tokens_checked: int


def probe_texts(hf_tokenizer) -> list[tuple[str, bool]]:
    """(text, add_special_tokens) pairs: the probe, and a conversation rendered through the chat template."""
    texts = [(PROBE_TEXT, True)]
    if getattr(hf_tokenizer, "chat_template", None):
        rendered = hf_tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False, add_generation_prompt=True)
        texts.append((rendered, False))  # the template writes its own special tokens
    return texts


def check_tokenizer_parity(gguf_path: Path, model_path: Path) -> TokenizerParity:
    """Each probe text tokenized by llama.cpp and the Hugging Face tokenizer, once with special tokens parsed and
    once with them split into plain text (llama.cpp's parse_special=False, HF's split_special_tokens=True: how a
    chat's message text is tokenized), which tells a CONTROL token from a USER_DEFINED one."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the probe may be longer than a tiny model's context; we only tokenize
    hf_tokenizer = AutoTokenizer.from_pretrained(model_path)
    llm = llamacpp.open_gguf(gguf_path, vocab_only=True)
    checked = 0
    texts = probe_texts(hf_tokenizer)
    for text, add_special in texts:
        for parse_special in (True, False):
            expected = hf_tokenizer(text, add_special_tokens=add_special,
                                    split_special_tokens=not parse_special)["input_ids"]
            got = llamacpp.tokenize(llm, text, add_special=add_special, parse_special=parse_special)
            if expected != got:
                raise ParityError(_difference(gguf_path.name, hf_tokenizer, expected, got, parse_special))
            checked += len(expected)
    return TokenizerParity(texts_checked=len(texts), tokens_checked=checked)


def _difference(name: str, hf_tokenizer, expected: list[int], got: list[int], parse_special: bool) -> str:
    pairs = zip(expected, got, strict=False)
    at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(expected), len(got)))
    context = hf_tokenizer.decode(expected[max(0, at - 3): at + 3])
    mode = "" if parse_special else " with special tokens as plain text"
    return (f"tokenizer parity failed for {name}{mode}: llama.cpp and the Hugging Face tokenizer differ at token "
            f"{at} (HF {expected[at:at + 5]} vs llama.cpp {got[at:at + 5]}; {len(expected)} vs {len(got)} tokens) "
            f"near {context!r}")


__all__ = ["LogitParity", "TokenizerParity", "check_logit_parity", "check_tokenizer_parity", "probe_texts"]
