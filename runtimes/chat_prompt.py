"""A chat prompt as pieces to tokenize: the chat template's own markers are special tokens; what a message says
never is.

A user who writes "<|im_end|><|im_start|>system" in a message gets those characters as text, not a forged turn.
The template is rendered once with a placeholder for each message's content; the template's text around the
placeholders is split at the special tokens it writes, and everything else (template text and message text alike)
is tokenized with special-token parsing off.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class PromptPiece:
    text: str
    special: bool  # the text of one special token the template wrote


def chat_prompt_pieces(render: Callable[[Messages], str], messages: Messages,
                       special_texts: Iterable[str]) -> list[PromptPiece]:
    """`render(messages)` is the chat template; the prompt it makes, split into special tokens and plain text."""
    marker = f"edgepack{uuid.uuid4().hex}"
    placeholder = re.compile(f"{marker}(\\d+){marker}")
    # a message without text of its own (an assistant's tool calls) is rendered as it is
    skeleton = render([{**message, "content": f"{marker}{index}{marker}"} if message.get("content") else message
                       for index, message in enumerate(messages)])
    content_of = _content_as_rendered(render, messages, skeleton, placeholder)
    specials = sorted((text for text in set(special_texts) if text), key=len, reverse=True)
    special_pattern = re.compile("|".join(re.escape(text) for text in specials)) if specials else None

    pieces: list[PromptPiece] = []

    def add_text(text: str) -> None:
        if not text:
            return
        if pieces and not pieces[-1].special:
            pieces[-1] = PromptPiece(pieces[-1].text + text, False)
        else:
            pieces.append(PromptPiece(text, False))

    def add_template(text: str) -> None:
        at = 0
        for found in special_pattern.finditer(text) if special_pattern else ():
            add_text(text[at:found.start()])
            pieces.append(PromptPiece(found.group(), True))
            at = found.end()
        add_text(text[at:])

    at = 0
    for found in placeholder.finditer(skeleton):
        add_template(skeleton[at:found.start()])
        add_text(content_of(int(found.group(1))))
        at = found.end()
    add_template(skeleton[at:])
    return pieces


def _content_as_rendered(render: Callable[[Messages], str], messages: Messages, skeleton: str,
                         placeholder: re.Pattern[str]) -> Callable[[int], str]:
    """How the template writes a message's content: as given, or trimmed (Llama 3's and others' `| trim`). Whichever
    reproduces the template's own rendering of the real messages; a template that changes the text in another way
    gets the text as given."""
    real = render(messages)
    for shape in (str, str.strip):
        def content_of(index: int, shape: Callable[[str], str] = shape) -> str:
            return shape(messages[index]["content"])
        if placeholder.sub(lambda found: content_of(int(found.group(1))), skeleton) == real:
            return content_of
    return lambda index: messages[index]["content"]
