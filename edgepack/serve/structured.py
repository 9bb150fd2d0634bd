"""Structured output: OpenAI's `response_format` as a llama.cpp grammar that the sampler enforces token by token.

`json_object` allows any JSON object; `json_schema` an object that validates against the schema, written as GBNF
by llama-cpp-python's JSON-Schema converter. Its string rule lets raw control characters into strings, which
JSON forbids (a model's newline inside a string would not parse), so that rule is narrowed here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgepack.core.errors import EdgepackError

# JSON strings: any character but '"', '\' and the control characters U+0000-U+001F, or an escape
_JSON_CHAR_RULE = ('char ::= [^"\\\\\\x00-\\x1F\\x7F] | "\\\\" (["\\\\/bfnrt] | '
                   '"u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])')
_CONVERTER_CHAR_RULE = re.compile(r"^char ::= .*$", re.MULTILINE)


def json_grammar(schema: dict[str, Any] | None) -> str:
    """A GBNF grammar (root rule "root") for JSON that validates against `schema`; None: any JSON object."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(json.dumps(schema if schema is not None else {"type": "object"}))
    except Exception as exc:  # the converter raises plain exceptions for what it does not support
        raise EdgepackError(f"response_format: the JSON schema cannot be turned into a grammar: {exc}") from exc
    return narrow_json_strings(grammar)


def narrow_json_strings(grammar: str) -> str:
    """The converter's grammar with its string characters narrowed to what JSON allows."""
    return _CONVERTER_CHAR_RULE.sub(lambda _: _JSON_CHAR_RULE, grammar)


def response_format_grammar(response_format) -> str | None:
    """The grammar for a request's ResponseFormat (edgepack.serve.protocol), or None for plain text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_grammar(None)
    return json_grammar(response_format.json_schema.schema_)
