"""The tokenizer of an ONNX variant as a vocabulary-only GGUF (tokenizer.gguf): the ONNX engine constrains output
(response_format, forced tool calls) with llama.cpp's grammar sampler, which works on a llama.cpp vocabulary, so
structured output behaves the same on both engines."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgepack.core.errors import ParityError, UnsupportedModelError
from edgepack.core.onnx_folder import GRAMMAR_VOCAB_FILE
from edgepack.core.progress import say


def write_grammar_vocab(model_path: Path, dst: Path) -> bool:
    """The tokenizer as a vocabulary-only GGUF in `dst`, checked to tokenize as the model's own tokenizer does, so
    that the ONNX engine can constrain output with llama.cpp's grammar sampler (response_format, forced tool calls).
    False, with nothing written, where our GGUF converter does not take the model or its tokenizer."""
    from converters.gguf.from_hf import convert_hf_to_gguf
    from converters.gguf.parity import check_tokenizer_parity

    path = dst / GRAMMAR_VOCAB_FILE
    try:
        convert_hf_to_gguf(model_path, path, vocab_only=True, force=True, show_progress=False)
        check_tokenizer_parity(path, model_path)
    except (UnsupportedModelError, ParityError) as exc:
        path.unlink(missing_ok=True)
        say(f"no output grammars on the ONNX engine for this model: {exc}")
        return False
    return True


def copy_grammar_vocab(src: Path, dst: Path) -> None:
    if (src / GRAMMAR_VOCAB_FILE).is_file():
        shutil.copy2(src / GRAMMAR_VOCAB_FILE, dst / GRAMMAR_VOCAB_FILE)
