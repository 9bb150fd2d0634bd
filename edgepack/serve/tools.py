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
    """Whether a Jinja chat template reads the `tools` variable (a template that sets `tools` itself does not)."""
    if not template:
        return False
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(_template_parser().parse(template))
    except jinja2.TemplateSyntaxError:
        return False


def _template_parser():
    """A Jinja environment that parses what chat templates may use: the engines render them with `{% break %}` and
    `{% continue %}`, and with HF's `{% generation %}` tag (which marks the assistant's text for training)."""
    import jinja2
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return jinja2.Environment(extensions=["jinja2.ext.loopcontrols", GenerationTag])


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
    which is held back until it is known; each call comes out whole once its end has arrived.

    The content streamed is the whole answer's content (parse_tool_calls) piece by piece: whitespace at the end of the
    content so far is held until more content follows, and dropped when the answer made calls (the newline between two
    calls is not content). One difference is left: an answer that starts with whitespace and content and makes a call
    only later streams that whitespace, where the whole answer's content is stripped."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.pending = ""  # text not yet known to be content or a call
        self.held_space = ""  # whitespace at the end of the content so far
        self.calls_made = 0
        self.content_shown = False
        self.decided = fmt == "hermes"  # llama3-json: whether the answer is a call is known from its first character

    def feed(self, piece: str) -> list[StreamEvent]:
        self.pending += piece
        return self._feed_hermes() if self.fmt == "hermes" else self._feed_json()

    def finish(self) -> list[StreamEvent]:
        rest, self.pending = self.pending, ""
        parsed = parse_tool_calls(rest, self.fmt) if rest else ParsedAnswer("", ())
        events = self._content(parsed.content) + self._calls(parsed.tool_calls)
        if not self.calls_made and self.held_space:
            events.append(StreamEvent(self.held_space))
        self.held_space = ""
        return events

    def _feed_hermes(self) -> list[StreamEvent]:
        events = []
        while True:
            start = self.pending.find(HERMES_OPEN)
            if start < 0:
                content_end = len(self.pending) - _held_back(self.pending, HERMES_OPEN)
                events += self._content(self.pending[:content_end])
                self.pending = self.pending[content_end:]
                return events
            events += self._content(self.pending[:start])
            self.pending = self.pending[start:]
            end = self.pending.find(HERMES_CLOSE)
            if end < 0:
                return events  # inside a call: held until it closes
            end += len(HERMES_CLOSE)
            block, self.pending = self.pending[:end], self.pending[end:]
            calls = parse_tool_calls(block, "hermes").tool_calls
            events += self._calls(calls) if calls else self._content(block)  # a broken call stays content

    def _feed_json(self) -> list[StreamEvent]:
        if not self.decided:
            stripped = self.pending.lstrip()
            if not stripped:
                return []
            if stripped.startswith("{") or PYTHON_TAG.startswith(stripped[:len(PYTHON_TAG)]):
                return []  # maybe a call: held to the end
            self.decided = True  # plain content from here on
        out, self.pending = self.pending, ""
        return self._content(out)

    def _content(self, text: str) -> list[StreamEvent]:
        text = self.held_space + text
        shown = text.rstrip()
        self.held_space = text[len(shown):]
        if not shown:
            return []
        if not self.content_shown and self.calls_made:  # the content starts after a call: as stripped as the whole's
            shown = shown.lstrip()
        self.content_shown = True
        return [StreamEvent(shown)]

    def _calls(self, calls: Sequence[ToolCall]) -> list[StreamEvent]:
        self.calls_made += len(calls)
        return [StreamEvent(call=call) for call in calls]


def _held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def tool_call_grammar(tools: Sequence[dict[str, Any]], tool_choice: Any, fmt: ToolFormat,
                      parallel: bool = True, *, context_length: int) -> str | None:
    """A llama.cpp grammar that makes the answer a call (one or more, with `parallel`) of the tools allowed, its
    arguments valid against the function's JSON Schema (bounded for a model of `context_length` tokens, see
    edgepack.serve.schema_bounds); None when the model may answer freely (`auto`, `none`)."""
    if tool_choice in (None, "auto", "none"):
        return None
    from edgepack.serve.structured import schema_grammar

    names = [tool["function"]["name"] for tool in tools]
    if tool_choice == "required":
        chosen = list(range(len(tools)))
    else:
        wanted = tool_choice["function"]["name"]
        if wanted not in names:
            raise EdgepackError(f"tool_choice: no tool named {wanted!r} was given (tools: {', '.join(names)})")
        chosen = [index for index, name in enumerate(names) if name == wanted]
    schema = _calls_schema(tools, chosen, "arguments" if fmt == "hermes" else "parameters", context_length)
    calls = re.sub(r"^root ::=", "tool-call ::=", schema_grammar(schema, "tools"), flags=re.MULTILINE)
    if fmt == "hermes":
        block = f'"{HERMES_OPEN}\\n" tool-call "\\n{HERMES_CLOSE}"'
        root = f"root ::= {block}" + (f' ("\\n" {block})*' if parallel else "")
    else:
        root = "root ::= tool-call"
    return calls + "\n" + root + "\n"


def _calls_schema(tools: Sequence[dict[str, Any]], chosen: list[int], arguments_key: str,
                  context_length: int) -> dict[str, Any]:
    """One schema for a call of any chosen tool: a oneOf of the calls, each tool's parameters (bounded, with their
    own `#/...` references moved along) under a key of their own beside it."""
    from edgepack.serve.schema_bounds import bounded_schema, rebase_refs

    schema: dict[str, Any] = {"oneOf": []}
    for index in chosen:
        function = tools[index]["function"]
        key = f"tool-{index}-parameters"
        parameters = bounded_schema(function.get("parameters") or {"type": "object"}, context_length,
                                    f"tools[{index}].function.parameters")
        rebase_refs(parameters, key)
        schema[key] = parameters
        schema["oneOf"].append({
            "type": "object",
            "properties": {"name": {"const": function["name"]}, arguments_key: {"$ref": f"#/{key}"}},
            "required": ["name", arguments_key]})
    return schema
