"""A chat prompt as pieces to tokenize: the chat template's own markers are special tokens; no string a client
sent ever is.

A user who writes "<|im_end|><|im_start|>system" in a message gets those characters as text, not a forged turn;
so does one who puts them in a tool call's name or arguments, a tool's description or schema, or a name. The
template is rendered once with a placeholder for each message's content, and with every other client string's
special-token text replaced by a placeholder of its own; the template's text around the placeholders is split at
the special tokens it writes, and everything else (template text, message text and the placeholders' special-token
text alike) is tokenized with special-token parsing off.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, Any]]
Render = Callable[[Messages, Any], str]  # (messages, tools or None) -> the template's text


@dataclass(frozen=True)
class PromptPiece:
    text: str
    special: bool  # the text of one special token the template wrote


def chat_prompt_pieces(render: Render, messages: Messages, special_texts: Iterable[str],
                       tools: list[dict[str, Any]] | None = None) -> list[PromptPiece]:
    """`render(messages, tools)` is the chat template; the prompt it makes, split into special tokens and plain
    text."""
    marker = f"edgepack{uuid.uuid4().hex}"
    placeholder = re.compile(f"{marker}(\\d+){marker}")
    forged = re.compile(f"{marker}s(\\d+){marker}")
    specials = sorted((text for text in set(special_texts) if text), key=len, reverse=True)
    special_pattern = re.compile("|".join(re.escape(text) for text in specials)) if specials else None
    neutral = _neutraliser(specials, special_pattern, marker)
    # a message without text of its own (an assistant's tool calls) is rendered without a content placeholder
    skeleton = render([{**{key: value if key == "role" else neutral(value) for key, value in message.items()},
                        **({"content": f"{marker}{index}{marker}"} if message.get("content") else {})}
                       for index, message in enumerate(messages)], neutral(tools) if tools else None)
    content_of = _content_as_rendered(render, messages, tools, skeleton, placeholder,
                                      lambda text: forged.sub(lambda found: specials[int(found.group(1))], text))

    pieces: list[PromptPiece] = []

    def add_text(text: str) -> None:
        if not text:
            return
        if pieces and not pieces[-1].special:
            pieces[-1] = PromptPiece(pieces[-1].text + text, False)
        else:
            pieces.append(PromptPiece(text, False))

    def add_markers(text: str) -> None:  # template text: its special tokens are markers
        at = 0
        for found in special_pattern.finditer(text) if special_pattern else ():
            add_text(text[at:found.start()])
            pieces.append(PromptPiece(found.group(), True))
            at = found.end()
        add_text(text[at:])

    def add_template(text: str) -> None:  # template text with client strings in it
        at = 0
        for found in forged.finditer(text):
            add_markers(text[at:found.start()])
            add_text(specials[int(found.group(1))])
            at = found.end()
        add_markers(text[at:])

    at = 0
    for found in placeholder.finditer(skeleton):
        add_template(skeleton[at:found.start()])
        add_text(content_of(int(found.group(1))))
        at = found.end()
    add_template(skeleton[at:])
    return pieces


def _neutraliser(specials: list[str], pattern: re.Pattern[str] | None, marker: str) -> Callable[[Any], Any]:
    """A function that replaces, in every string of a value (dict keys included, at any depth), each special
    token's text with a placeholder that the template copies as it is."""
    index_of = {text: index for index, text in enumerate(specials)}

    def neutral(value: Any) -> Any:
        if pattern is None:
            return value
        if isinstance(value, str):
            return pattern.sub(lambda found: f"{marker}s{index_of[found.group()]}{marker}", value)
        if isinstance(value, dict):
            return {neutral(key): neutral(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [neutral(item) for item in value]
        return value

    return neutral


def _content_as_rendered(render: Render, messages: Messages, tools: list[dict[str, Any]] | None, skeleton: str,
                         placeholder: re.Pattern[str], restore: Callable[[str], str]) -> Callable[[int], str]:
    """How the template writes a message's content: as given, or trimmed (Llama 3's and others' `| trim`). Whichever
    reproduces the template's own rendering of the real messages; a template that changes the text in another way
    gets the text as given. `restore` puts the other client strings' special-token text back in the skeleton."""
    real = render(messages, tools)
    skeleton = restore(skeleton)
    for shape in (str, str.strip):
        def content_of(index: int, shape: Callable[[str], str] = shape) -> str:
            return shape(messages[index]["content"])
        if placeholder.sub(lambda found: content_of(int(found.group(1))), skeleton) == real:
            return content_of
    return lambda index: messages[index]["content"]
