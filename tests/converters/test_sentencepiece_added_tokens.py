"""SentencePiece added tokens in GGUF: Gemma 3's whitespace runs, HTML tags and chat markers tokenize in llama.cpp
as in the Hugging Face tokenizer, with special-token parsing on and off."""

from __future__ import annotations

import pytest
from synth_models import GEMMA_CHAT_MARKERS

from converters.gguf.parity import probe_texts
from converters.probe_text import PROBE_TEXT
from converters.registry import ConvertOptions
from edgepack.convert.stage import convert
from runtimes import llamacpp

# where a real Gemma 3 first went wrong ("   three" became "  " + " three"), then newline and tab runs, tags,
# a space run longer than the longest space token, and a chat marker
GEMMA_TEXT = ("he's done.\n   three leading\n\n\n\n<h1>Title</h1>\t\t<td>a  b</td>" + " " * 40
              + "<start_of_turn>user\nhi<end_of_turn>\n")


@pytest.fixture(scope="module")
def gemma(tiny_model):
    from transformers import AutoTokenizer

    model_dir = tiny_model("gemma3-spm")
    return model_dir, AutoTokenizer.from_pretrained(model_dir)


def test_tiny_gemma_tokenizer_is_its_sentencepiece_model(gemma):
    """The reference is right: the Hugging Face tokenizer splits the probe as SentencePiece itself does."""
    import sentencepiece as spm

    model_dir, hf = gemma
    sentencepiece = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    for text in (PROBE_TEXT, GEMMA_TEXT.split("<start_of_turn>")[0]):
        assert hf(text, add_special_tokens=False)["input_ids"] == sentencepiece.encode(text)


def test_parity_probe_exercises_gemma_added_tokens(gemma):
    """The tokenizer parity check run on every conversion meets space, newline and tab runs, tags and markers."""
    _, hf = gemma
    pieces = set()
    for text, add_special in probe_texts(hf):
        pieces |= set(hf.convert_ids_to_tokens(hf(text, add_special_tokens=add_special)["input_ids"]))
    assert {"\u2581" * 3, "\u2581" * 31, "\n\n\n\n", "\t\t\t\t", "<h1>", "</h1>", "<td>", *GEMMA_CHAT_MARKERS} <= pieces


def test_gemma_added_tokens_tokenize_as_hugging_face(gemma, tmp_path):
    model_dir, hf = gemma
    (variant,) = convert(model_dir, ["gguf-f32"], tmp_path, ConvertOptions(show_progress=False))  # parity inside
    llm = llamacpp.open_gguf(variant.path, vocab_only=True)
    for parse_special in (True, False):
        expected = hf(GEMMA_TEXT, split_special_tokens=not parse_special)["input_ids"]
        assert llamacpp.tokenize(llm, GEMMA_TEXT, add_special=True, parse_special=parse_special) == expected
