"""OpenAI tool calling through the model's own chat template: which templates take tools, how their models write a
call, reading calls out of an answer (whole, or as it streams), and the grammar that makes the answer a call when
the request requires one.

Formats, told apart by the template's text:
- `hermes` (Hermes, Qwen 2.5/3, SmolLM3 and most templates that write `<tool_call>`): each call is
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; text outside the markers is the answer's content.
- `llama3-json` (Llama 3.1/3.2: templates that write `<|python_tag|>` or ask for `"parameters"`): the whole answer is
  `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edgepack.core.errors import EdgepackError

ToolFormat = Literal["hermes", "llama3-json"]
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


def template_takes_tools(template: str | None) -> bool:
    """Whether a Jinja chat template reads the `tools` variable."""
    if not template:
        return False
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return False


def tool_format(template: str | None) -> ToolFormat:
    """How the model behind `template` writes a tool call; an EdgepackError when the template takes no tools or
    writes calls in a way this server does not read."""
    if not template_takes_tools(template):
        raise EdgepackError("tools: this model's chat template has no tool support (it never reads `tools`)")
    if HERMES_OPEN in template:
        return "hermes"
    if PYTHON_TAG in template or '"parameters"' in template:
        return "llama3-json"
    raise EdgepackError("tools: this model's chat template takes tools, but its call format is not one this server "
                        "reads (known: <tool_call>{...}</tool_call> as Hermes and Qwen write it, and Llama 3's JSON "
                        "with \"parameters\")")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedAnswer:
    content: str
    tool_calls: tuple[ToolCall, ...]


def _call_from_json(text: str, arguments_key: str) -> ToolCall | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get(arguments_key, data.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments already as text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(data["name"], json.dumps(arguments, ensure_ascii=False))


_HERMES_CALL = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*" + re.escape(HERMES_CLOSE), re.DOTALL)


def parse_tool_calls(text: str, fmt: ToolFormat) -> ParsedAnswer:
    """The content and the calls in a whole answer. A call whose JSON does not parse stays in the content."""
    if fmt == "hermes":
        calls, content, at = [], [], 0
        for found in _HERMES_CALL.finditer(text):
            call = _call_from_json(found.group(1), "arguments")
            if call is None:
                continue
            content.append(text[at:found.start()])
            at = found.end()
            calls.append(call)
        content.append(text[at:])
        return ParsedAnswer("".join(content).strip() if calls else text, tuple(calls))
    body = text.strip()
    body = body[len(PYTHON_TAG):].strip() if body.startswith(PYTHON_TAG) else body
    call = _call_from_json(body, "parameters") if body.startswith("{") else None
    return ParsedAnswer("", (call,)) if call else ParsedAnswer(text, ())


@dataclass(frozen=True)
class StreamEvent:
    content: str = ""
    call: ToolCall | None = None


class ToolCallStream:
    """Reads an answer as it streams: content comes out as it arrives, except text that may be the start of a call,
    which is held back until it is known; each call comes out whole once its end has arrived."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.pending = ""
        self.decided = fmt == "hermes"  # llama3-json: whether the answer is a call is known from its first character

    def feed(self, piece: str) -> list[StreamEvent]:
        self.pending += piece
        if self.fmt == "llama3-json":
            return self._feed_json()
        events = []
        while True:
            start = self.pending.find(HERMES_OPEN)
            if start < 0:
                keep = _held_back(self.pending, HERMES_OPEN)
                if len(self.pending) > keep:
                    events.append(StreamEvent(self.pending[:len(self.pending) - keep]))
                    self.pending = self.pending[len(self.pending) - keep:]
                return events
            end = self.pending.find(HERMES_CLOSE, start)
            if end < 0:
                if start:
                    events.append(StreamEvent(self.pending[:start]))
                    self.pending = self.pending[start:]
                return events
            whole = self.pending[:end + len(HERMES_CLOSE)]
            parsed = parse_tool_calls(whole, "hermes")
            if parsed.content or not parsed.tool_calls:
                events.append(StreamEvent(parsed.content if parsed.tool_calls else whole))
            events += [StreamEvent(call=call) for call in parsed.tool_calls]
            self.pending = self.pending[end + len(HERMES_CLOSE):]

    def _feed_json(self) -> list[StreamEvent]:
        if not self.decided:
            stripped = self.pending.lstrip()
            if not stripped:
                return []
            if not (stripped.startswith("{") or PYTHON_TAG.startswith(stripped[:len(PYTHON_TAG)])):
                self.decided = True  # plain content from here on
                out, self.pending = self.pending, ""
                return [StreamEvent(out)]
            return []  # maybe a call: held to the end
        out, self.pending = self.pending, ""
        return [StreamEvent(out)] if out else []

    def finish(self) -> list[StreamEvent]:
        rest, self.pending = self.pending, ""
        if not rest:
            return []
        parsed = parse_tool_calls(rest, self.fmt)
        events = [StreamEvent(parsed.content)] if parsed.content else []
        return events + [StreamEvent(call=call) for call in parsed.tool_calls]


def _held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def tool_call_grammar(tools: Sequence[dict[str, Any]], tool_choice: Any, fmt: ToolFormat,
                      parallel: bool = True) -> str | None:
    """A llama.cpp grammar that makes the answer a call (one or more, with `parallel`) of the tools allowed, its
    arguments valid against the function's JSON Schema; None when the model may answer freely (`auto`, `none`)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from edgepack.serve.structured import narrow_json_strings

    if tool_choice in (None, "auto", "none"):
        return None
    names = [tool["function"]["name"] for tool in tools]
    if tool_choice == "required":
        chosen = list(tools)
    else:
        wanted = tool_choice["function"]["name"]
        if wanted not in names:
            raise EdgepackError(f"tool_choice: no tool named {wanted!r} was given (tools: {', '.join(names)})")
        chosen = [tool for tool in tools if tool["function"]["name"] == wanted]
    arguments_key = "arguments" if fmt == "hermes" else "parameters"
    schema = {"oneOf": [{
        "type": "object", "properties": {
            "name": {"const": tool["function"]["name"]},
            arguments_key: tool["function"].get("parameters") or {"type": "object"}},
        "required": ["name", arguments_key]} for tool in chosen]}
    calls = re.sub(r"^root ::=", "tool-call ::=", narrow_json_strings(json_schema_to_gbnf(json.dumps(schema))),
                   flags=re.MULTILINE)
    if fmt == "hermes":
        block = f'"{HERMES_OPEN}\\n" tool-call "\\n{HERMES_CLOSE}"'
        root = f"root ::= {block}" + (f' ("\\n" {block})*' if parallel else "")
    else:
        root = "root ::= tool-call"
    return calls + "\n" + root + "\n"
