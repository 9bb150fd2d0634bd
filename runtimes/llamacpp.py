"""llama.cpp through llama-cpp-python: load a GGUF, tokenize, logits, greedy generation."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from edgepack.errors import EdgepackError


def open_gguf(path: Path, *, vocab_only: bool = False, n_ctx: int = 512, logits_all: bool = False,
              n_threads: int | None = None):
    """A llama_cpp.Llama over `path`, or a clear error when the file is not a loadable GGUF."""
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise EdgepackError(f"{path} does not exist; expected a .gguf file")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise EdgepackError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        with quiet_native_stderr():
            return Llama(model_path=str(path), vocab_only=vocab_only, n_ctx=n_ctx, logits_all=logits_all,
                         n_threads=n_threads or max(1, (os.cpu_count() or 2)), n_batch=max(n_ctx, 8),
                         verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise EdgepackError(f"llama.cpp could not load {path}: the file is truncated, corrupt or of an "
                            f"unsupported architecture ({exc})") from exc


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """llama.cpp prints some load-time notes straight to file descriptor 2, past verbose=False; hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(devnull.fileno(), 2)  # C-level writes
            yield  # Python-level writes (llama-cpp-python's log callback) go to the StringIO
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def tokenize(llm, text: str, *, add_special: bool) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)


def sequence_logits(llm, token_ids: list[int]) -> np.ndarray:
    """Logits at every position of `token_ids` (shape [len, vocab]), float32."""
    llm.reset()
    llm.eval(token_ids)
    return np.array(llm.scores[: len(token_ids)], dtype=np.float32)


def greedy_text(llm, token_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation of `token_ids` (stops at end of generation)."""
    llm.reset()
    produced: list[int] = []
    for token in llm.generate(token_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if llm.token_eos() == token or _is_eog(llm, token):
            break
        produced.append(token)
        if len(produced) >= max_tokens:
            break
    return produced


def _is_eog(llm, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))
