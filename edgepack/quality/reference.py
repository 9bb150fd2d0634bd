"""Reference logits of the original model over the evaluation text, computed once and cached.

The text is tokenized once by the reference tokenizer and cut into windows of the context length (each begins
with the tokens the tokenizer puts at the start of a text, e.g. BOS). As llama.cpp's perplexity tool does, only the
second half of each window is scored (`first_scored`): every scored token has at least half a window of context.
Per scored position the cache keeps the top-k log-probabilities, the remaining mass and the log-probability of the
actual next token: a few hundred bytes per position instead of the whole vocabulary. The cache key covers the
weights (sha256 of every weight file), the text, the window and k.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.core.cache import cache_root
from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import atomic_output_file, sha256_file
from edgepack.quality.metrics import ReferencePositions, reference_positions

CACHE_FORMAT = 2  # 2: the second half of each window
DEFAULT_TOP_K = 1024  # the demo's reference leaves 14% of its mass outside its top 32, 1% outside its top 2048
DEFAULT_EVAL_TEXT = Path(__file__).with_name("eval_text.txt")


@dataclass(frozen=True)
class EvalWindows:
    windows: tuple[tuple[int, ...], ...]  # token ids of each window, start tokens included

    @property
    def positions(self) -> int:
        """Positions scored: from first_scored to the last but one of each window."""
        return sum(len(w) - 1 - first_scored(len(w)) for w in self.windows)


def first_scored(window_length: int) -> int:
    """The first position of a window whose prediction is scored (its logits predict the token after it)."""
    return window_length // 2


def read_eval_text(path: Path | None) -> str | None:
    """`--eval-text FILE`'s text; None when no file is given (the built-in text is used)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise EdgepackError(f"evaluation text {path} does not exist")
    return Path(path).read_text(encoding="utf-8")


def make_windows(runtime, text: str, window: int) -> EvalWindows:
    """Cut `text` into windows of at most `window` tokens, each starting like a fresh text (BOS if any)."""
    start = runtime.tokenize("", add_special=True)
    body = runtime.tokenize(text, add_special=False)
    step = window - len(start)
    windows = tuple(tuple(start + body[i:i + step]) for i in range(0, len(body), step))
    return EvalWindows(tuple(w for w in windows if len(w) - 1 - first_scored(len(w)) >= 1))


def model_fingerprint(model_path: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(model_path.iterdir()):
        if path.suffix in (".safetensors", ".bin", ".json", ".model") and path.is_file():
            digest.update(path.name.encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_path(model_path: Path, text: str, window: int, top_k: int) -> Path:
    key = json.dumps([CACHE_FORMAT, model_fingerprint(model_path), text_sha256(text), window, top_k])
    return cache_root() / "reference" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def reference_for(runtime, model_path: Path, text: str, windows: EvalWindows, window: int,
                  top_k: int = DEFAULT_TOP_K, on_window: Callable[[], None] | None = None) -> list[ReferencePositions]:
    """The reference positions per window (`windows` from make_windows), from the cache or computed (and
    cached) with `runtime`."""
    path = cache_path(model_path, text, window, top_k)
    if path.is_file():
        with np.load(path) as data:
            stored = [tuple(int(t) for t in data[f"window{i}"]) for i in range(int(data["count"]))]
            if tuple(stored) == windows.windows:
                return [ReferencePositions(*(data[f"{name}{i}"] for name in _FIELDS)) for i in range(len(stored))]
    computed = []
    for tokens in windows.windows:
        first = first_scored(len(tokens))
        logits = runtime.logits_from(tokens, first)[:-1]
        computed.append(reference_positions(logits, np.asarray(tokens[first + 1:]), top_k))
        if on_window is not None:
            on_window()
    arrays = {"count": np.asarray(len(computed))}
    for i, (tokens, positions) in enumerate(zip(windows.windows, computed, strict=True)):
        arrays[f"window{i}"] = np.asarray(tokens, dtype=np.int32)
        for name in _FIELDS:
            arrays[f"{name}{i}"] = getattr(positions, name)
    with atomic_output_file(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)  # compressed it is 30% smaller but takes 12 s to write on the demo
    return computed


_FIELDS = ("top_ids", "top_logprobs", "rest_logmass", "targets", "target_logprobs")
