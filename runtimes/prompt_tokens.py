"""A prompt's tokens, read a run at a time: linear in the prompt's length, and stopped as soon as it is past the
context (or its client has gone).

Tokenizing a whole prompt with special-token parsing costs llama.cpp time quadratic in the number of special
tokens in it (each one found splits the text, and the rest is copied): 8k one-character chat messages took 1.5 s,
24k took 12 s. Here the prompt is cut into runs, each a special token and the text up to the next one, and each run
is tokenized as the text "special + text + next special" with parsing on. That gives exactly the tokens the whole
text would: a tokenizer never merges across a special token, and the text between two specials is trimmed by both
of them (the lstrip/rstrip of Phi-3's markers, a SentencePiece space after a special) just as in the whole text. A
run whose text holds special-token text that the prompt's author did not write as a marker (a message that
tries to forge one) has that text tokenized as plain text.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence

from edgepack.core.errors import EdgepackError
from runtimes.chat_prompt import PromptPiece

Tokenize = Callable[..., list[int]]  # (text, add_special=..., parse_special=...) -> ids


class PromptTooLong(EdgepackError):
    """The prompt has more tokens than the context holds (counted until it was past it)."""

    def __init__(self, tokens_at_least: int, limit: int) -> None:
        super().__init__(f"the prompt has at least {tokens_at_least} tokens; the context holds {limit}")
        self.tokens_at_least, self.limit = tokens_at_least, limit


class PromptCancelled(Exception):
    """Whoever asked for the prompt's tokens no longer wants them (a client that went away)."""


def special_pattern(special_texts: Sequence[str]) -> re.Pattern[str] | None:
    texts = sorted({text for text in special_texts if text}, key=len, reverse=True)
    return re.compile("|".join(re.escape(text) for text in texts)) if texts else None


def pieces_of_text(text: str, pattern: re.Pattern[str] | None) -> list[PromptPiece]:
    """A raw prompt (the completions API's, where special-token text is parsed) as pieces."""
    pieces, at = [], 0
    for found in pattern.finditer(text) if pattern else ():
        pieces += [PromptPiece(text[at:found.start()], False), PromptPiece(found.group(), True)]
        at = found.end()
    pieces.append(PromptPiece(text[at:], False))
    return [piece for piece in pieces if piece.text]


def tokenize_in_runs(tokenize: Tokenize, pieces: Sequence[PromptPiece], id_of: dict[str, int],
                     pattern: re.Pattern[str] | None, add_special: bool, limit: int | None = None,
                     cancel: threading.Event | None = None) -> list[int]:
    """The tokens of `pieces` (special ones written by the template; plain text may hold forged special text);
    `add_special`: the tokens the model puts first (BOS). Raises PromptTooLong past `limit` tokens and
    PromptCancelled once `cancel` is set."""
    runs = _runs(pieces)
    ids: list[int] = []
    for index, (lead, text) in enumerate(runs):
        if cancel is not None and cancel.is_set():
            raise PromptCancelled()
        follow = runs[index + 1][0] if index + 1 < len(runs) else None
        ids += _run_tokens(tokenize, lead, text, follow, id_of, pattern, add_special and index == 0)
        if limit is not None and len(ids) > limit:
            raise PromptTooLong(len(ids), limit)
    return ids


def _runs(pieces: Sequence[PromptPiece]) -> list[tuple[str | None, str]]:
    """(the special token that starts the run, or None for text before the first; the text after it)."""
    runs: list[tuple[str | None, str]] = []
    for piece in pieces:
        if piece.special:
            runs.append((piece.text, ""))
        elif runs:
            runs[-1] = (runs[-1][0], runs[-1][1] + piece.text)
        else:
            runs.append((None, piece.text))
    return runs


def _run_tokens(tokenize: Tokenize, lead: str | None, text: str, follow: str | None, id_of: dict[str, int],
                pattern: re.Pattern[str] | None, first: bool) -> list[int]:
    lead_ids = [id_of[lead]] if lead is not None else []
    if pattern is None or not pattern.search(text):
        tokens = tokenize((lead or "") + text + (follow or ""), add_special=first, parse_special=True)
        if follow is None:
            if lead is None or lead_ids[0] in tokens:
                return tokens
        elif tokens and tokens[-1] == id_of[follow] and (lead is None or lead_ids[0] in tokens):
            return tokens[:-1]
    # forged special text in the run (or a tokenizer that did not keep the markers whole): text as text
    start = tokenize("", add_special=True, parse_special=False) if first else []
    return start + lead_ids + (tokenize(text, add_special=False, parse_special=False) if text else [])
