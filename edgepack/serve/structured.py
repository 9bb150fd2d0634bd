"""Structured output: OpenAI's `response_format` as a llama.cpp grammar that the sampler enforces token by token.

`json_object` allows any JSON object; `json_schema` an object that validates against the schema, written as GBNF
by llama-cpp-python's JSON-Schema converter once the schema is checked and bounded (edgepack.serve.schema_bounds).
Two of its rules are replaced:
- its string rule lets raw control characters into strings, which JSON forbids (a model's newline inside a string
  would not parse), so that rule is narrowed here;
- it writes a count (minLength, maxItems...) as that many copies or nested groups, which llama.cpp's parser refuses
  past ~1,000 and recurses on (30,000 overflowed its stack); here counts are GBNF repetitions `x{m,n}`, and a count
  above SPLIT_ABOVE is written as blocks of ~sqrt(n): llama.cpp expands `x{0,n}` into n rules and takes n <= 2,000.
The finished grammar is held to MAX_GRAMMAR_BYTES, MAX_GRAMMAR_RULES and MAX_REPEAT_ELEMENTS, so that compiling the
largest one allowed stays cheap (it is compiled once to check it and once more for each generation).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

from edgepack.core.errors import EdgepackError
from edgepack.serve.schema_bounds import bounded_schema
from runtimes.base import DEFAULT_CONTEXT_CAP

# JSON strings: any character but '"', '\' and the control characters U+0000-U+001F, or an escape
_JSON_CHAR_RULE = ('char ::= [^"\\\\\\x00-\\x1F\\x7F] | "\\\\" (["\\\\/bfnrt] | '
                   '"u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])')
_CONVERTER_CHAR_RULE = re.compile(r"^char ::= .*$", re.MULTILINE)

SPLIT_ABOVE = 100  # counts up to this are written `x{m,n}` as they are
MAX_GRAMMAR_BYTES = 256 * 1024
MAX_GRAMMAR_RULES = 4_096
MAX_REPEAT_ELEMENTS = 25_000  # what llama.cpp expands the repetitions into (x{n}: n elements, x{0,n}: n rules)
RESPONSE_SCHEMA = "response_format.json_schema.schema"


def json_grammar(schema: dict[str, Any] | None, context_length: int = DEFAULT_CONTEXT_CAP,
                 where: str = RESPONSE_SCHEMA) -> str:
    """A GBNF grammar (root rule "root") for JSON that validates against `schema` (bounded for a model whose context
    holds `context_length` tokens); None: any JSON object."""
    if schema is None:
        return schema_grammar({"type": "object"}, where)
    return schema_grammar(bounded_schema(schema, context_length, where), where)


def schema_grammar(schema: dict[str, Any], where: str) -> str:
    """The grammar of a schema already bounded (schema_bounds.bounded_schema); an EdgepackError when it cannot be
    written, or only as a grammar too large to compile cheaply."""
    converter = _converter_class()()
    try:
        converter.visit(converter.resolve_refs(schema, "stdin"), "")
        grammar = converter.format_grammar()
    except Exception as exc:  # the converter asserts or raises on what schema_bounds did not foresee
        message = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise EdgepackError(f"{where}: the JSON schema cannot be turned into a grammar ({message})") from None
    _check_size(grammar, converter.repeat_elements, where)
    return narrow_json_strings(grammar)


def _check_size(grammar: str, repeat_elements: int, where: str) -> None:
    rules = grammar.count("\n") + 1
    if len(grammar.encode("utf-8")) > MAX_GRAMMAR_BYTES or rules > MAX_GRAMMAR_RULES or \
            repeat_elements > MAX_REPEAT_ELEMENTS:
        raise EdgepackError(f"{where}: the schema makes a grammar larger than this server compiles "
                            f"({len(grammar) // 1024} KiB, {rules} rules, {repeat_elements} repeated elements; at "
                            f"most {MAX_GRAMMAR_BYTES // 1024} KiB, {MAX_GRAMMAR_RULES} rules, {MAX_REPEAT_ELEMENTS} "
                            "repeated elements): fewer enum values, properties or long minimums")


def narrow_json_strings(grammar: str) -> str:
    """The converter's grammar with its string characters narrowed to what JSON allows."""
    return _CONVERTER_CHAR_RULE.sub(lambda _: _JSON_CHAR_RULE, grammar)


def response_format_grammar(response_format, context_length: int) -> str | None:
    """The grammar for a request's ResponseFormat (edgepack.serve.protocol), or None for plain text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_grammar(None, context_length)
    return json_grammar(response_format.json_schema.schema_, context_length)


@functools.cache
def _converter_class() -> type:
    """The converter class, made on first use: llama-cpp-python is imported only where grammars are made (an ONNX
    bundle may leave it out)."""
    from llama_cpp.llama_grammar import INVALID_RULE_CHARS_RE, PRIMITIVE_RULES, RESERVED_NAMES, SchemaConverter

    class BoundedConverter(SchemaConverter):
        """llama-cpp-python's converter, with string lengths and array item counts written as flat repetitions."""

        def __init__(self) -> None:
            super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            self.repeat_elements = 0

        def resolve_refs(self, schema, url):
            """Every `#...` reference, wherever it is (schema_bounds checked that each points at a schema), renamed
            `url#/ref-NAME`: the converter names a reference's rule after its last part, taken as it is where the
            schema is recursive (so "#" or "#/$defs/My Model" broke the grammar) and shared by references that end
            alike. (Its own resolve_refs also misses references beside a `$ref`, and refuses "#".)"""
            keys: dict[str, str] = {}
            stack = [schema]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    ref = node.get("$ref")
                    if isinstance(ref, str) and ref.startswith("#"):
                        if ref not in keys:
                            keys[ref] = self._ref_key(url, ref, len(keys))
                            self._refs[keys[ref]] = _pointed_at(schema, ref)
                        node["$ref"] = keys[ref]
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
            return schema

        def _ref_key(self, url: str, ref: str, number: int) -> str:
            name = INVALID_RULE_CHARS_RE.sub("-", ref.rsplit("/", 1)[-1].lstrip("#")) or "root"
            return f"{url}#/ref-{name}" if not any(key.endswith(f"/ref-{name}") for key in self._refs) \
                else f"{url}#/ref{number}-{name}"

        def visit(self, schema, name):
            rule_name = (name + "-" if name in RESERVED_NAMES else name) or "root"
            if _has_counts(schema, "string", ("minLength", "maxLength")) and not _string_special(schema):
                char = self._add_primitive("char", PRIMITIVE_RULES["char"])
                body = self._repeat(char, schema.get("minLength", 0), schema.get("maxLength"))
                return self._add_rule(rule_name, f'"\\"" {body} "\\"" space')
            if _has_counts(schema, "array", ("minItems", "maxItems")) and isinstance(schema.get("items"), dict):
                item = self.visit(schema["items"], f"{name}{'-' if name else ''}item")
                return self._add_rule(rule_name, f'"[" space {self._items(item, schema)} "]" space')
            return super().visit(schema, name)

        def _items(self, item: str, schema) -> str:
            low, high = schema.get("minItems", 0), schema.get("maxItems")
            if high == 0:
                return ""
            more = self._add_rule(f"{item}-more", f'"," space {item}')
            if low == 0:
                return f"( {item} {self._repeat(more, 0, None if high is None else high - 1)} )?"
            return f"{item} {self._repeat(more, low - 1, None if high is None else high - 1)}"

        def _repeat(self, item: str, low: int, high: int | None) -> str:
            """GBNF for `low` to `high` (None: any number) repetitions of the rule `item`."""
            parts = [self._exactly(item, low)]
            if high is None:
                parts.append(f"{item}*")
            elif high > low:
                parts.append(self._up_to(item, high - low))
            return " ".join(part for part in parts if part)

        def _exactly(self, item: str, count: int) -> str:
            if count <= SPLIT_ABOVE:
                self.repeat_elements += count
                return f"{item}{{{count}}}" if count else ""
            block, size = self._block(item, count)
            blocks, rest = divmod(count, size)
            self.repeat_elements += blocks + rest
            return f"{block}{{{blocks}}}" + (f" {item}{{{rest}}}" if rest else "")

        def _up_to(self, item: str, count: int) -> str:
            """0 to `count` repetitions, without ambiguity: fewer than `blocks` whole blocks and less than a block of
            items, or `blocks` whole blocks and up to `rest` items."""
            if count <= SPLIT_ABOVE:
                self.repeat_elements += count
                return f"{item}{{0,{count}}}"
            block, size = self._block(item, count)
            blocks, rest = divmod(count, size)
            self.repeat_elements += 2 * blocks + size + rest
            fewer = (f"{block}{{0,{blocks - 1}}} " if blocks > 1 else "") + f"{item}{{0,{size - 1}}}"
            full = f"{block}{{{blocks}}}" + (f" {item}{{0,{rest}}}" if rest else "")
            return f"( {fewer} | {full} )"

        def _block(self, item: str, count: int) -> tuple[str, int]:
            """A rule of `size` ~ sqrt(count) repetitions of `item`, shared by every count that uses that size."""
            size = math.isqrt(count - 1) + 1
            name = f"{item}-block-{size}"
            if name not in self._rules:
                self.repeat_elements += size
            return self._add_rule(name, f"{item}{{{size}}}"), size

    return BoundedConverter


def _pointed_at(schema: dict[str, Any], ref: str) -> Any:
    target = schema
    for part in ref[2:].split("/") if ref != "#" else []:
        target = target[part]
    return target


def _has_counts(schema, kind: str, keys: tuple[str, str]) -> bool:
    """Whether the converter would reach its count branch for `kind` (strings, arrays) with this schema: what it
    reads first ($ref, unions, lists of types, const, enum) is absent."""
    return (schema.get("type") == kind and any(key in schema for key in keys)
            and not any(key in schema for key in ("$ref", "oneOf", "anyOf", "const", "enum")))


def _string_special(schema) -> bool:
    """A string schema the converter writes from its pattern or format rather than its length."""
    from llama_cpp.llama_grammar import STRING_FORMAT_RULES

    fmt = schema.get("format") or ""
    return "pattern" in schema or bool(re.match(r"^uuid[1-5]?$", fmt)) or f"{fmt}-string" in STRING_FORMAT_RULES
