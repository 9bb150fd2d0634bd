"""A client's JSON Schema checked and bounded before it becomes a grammar (edgepack.serve.schema_bounds,
schema_patterns), and the grammar written for counts (edgepack.serve.structured): expected values worked out by
hand from the limits."""

from __future__ import annotations

import json
import re
import time

import llama_cpp
import pytest
from serving_helpers import grammar_takes

from edgepack.core.errors import EdgepackError
from edgepack.serve.schema_bounds import MAX_CHARS_PER_TOKEN, bounded_schema
from edgepack.serve.schema_patterns import PatternError, checked_pattern
from edgepack.serve.structured import json_grammar, schema_grammar
from edgepack.serve.tools import tool_call_grammar

WHERE = "response_format.json_schema.schema"


def refusal(schema, context: int = 512) -> str:
    with pytest.raises(EdgepackError) as info:
        json_grammar(schema, context)
    return str(info.value)


@pytest.fixture(scope="module")
def llm(tiny_gguf):
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def vocab(llm):
    return llama_cpp.llama_model_get_vocab(llm.model)


def compiles(vocab, grammar: str) -> bool:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
    return bool(sampler)


# -- counts ---------------------------------------------------------------------------------------------------

def test_a_maximum_the_context_cannot_reach_is_lowered_and_a_minimum_it_cannot_hold_refused():
    # a context of 512 tokens: a maximum is lowered to 512 * 16 = 8192, a minimum above 512 * 256 = 131072 refused
    assert bounded_schema({"type": "string", "maxLength": 30_000}, 512, WHERE)["maxLength"] == 8192
    assert bounded_schema({"type": "string", "maxLength": 3000}, 512, WHERE)["maxLength"] == 3000
    assert bounded_schema({"type": "string", "minLength": 10_000, "maxLength": 10**9}, 512, WHERE) == \
        {"type": "string", "minLength": 10_000, "maxLength": 10_000}  # never below the minimum
    assert bounded_schema({"type": "array", "maxItems": 9000.0}, 512, WHERE)["maxItems"] == 8192
    assert refusal({"type": "string", "minLength": 30_000_000}) == \
        f"{WHERE}.minLength: 30000000 cannot fit in the model's context of 512 tokens"
    assert 512 * MAX_CHARS_PER_TOKEN == 131_072
    json_grammar({"type": "string", "minLength": 131_072}, 512)  # the most that could fit: taken
    assert "cannot fit" in refusal({"type": "string", "minLength": 131_073})
    # a context so large that it could hold more than the 2,000 x 2,000 this server writes
    assert "more than this server writes a grammar for (4000000)" in \
        refusal({"type": "array", "minItems": 4_000_001}, context=65_536)


@pytest.mark.parametrize(("schema", "path", "reason"), [
    ({"type": "string", "minLength": 5, "maxLength": 3}, ".maxLength", "3 is below minLength 5: no value fits"),
    ({"type": "string", "maxLength": -1}, ".maxLength", "must be a whole number, 0 or more"),
    ({"type": "string", "minLength": 2.5}, ".minLength", "must be a whole number, 0 or more"),
    ({"type": "array", "minItems": True}, ".minItems", "must be a whole number, 0 or more"),
    ({"properties": {"a": {"maxLength": "9"}}}, ".properties.a.maxLength", "must be a whole number, 0 or more"),
])
def test_counts_that_are_not_counts_are_refused_by_their_path(schema, path, reason):
    assert refusal(schema) == f"{WHERE}{path}: {reason}"


def test_long_strings_are_flat_repetitions_in_blocks_of_about_their_square_root(vocab):
    # maxLength 3000: blocks of isqrt(2999) + 1 = 55 characters; 3000 = 54 * 55 + 30
    grammar = json_grammar({"type": "string", "maxLength": 3000}, 512)
    assert "char-block-55 ::= char{55}" in grammar
    assert 'root ::= "\\"" ( char-block-55{0,53} char{0,54} | char-block-55{54} char{0,30} ) "\\"" space' in grammar
    # minLength 200000 (context 4096 holds it): blocks of isqrt(199999) + 1 = 448; 200000 = 446 * 448 + 192
    grammar = json_grammar({"type": "string", "minLength": 200_000}, 4096)
    assert 'root ::= "\\"" char-block-448{446} char{192} char* "\\"" space' in grammar
    # short counts as they are; items after the first are '"," item'
    grammar = json_grammar({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5}, 512)
    assert 'root ::= "[" space integer integer-more{1} integer-more{0,3} "]" space' in grammar
    for schema, context in [({"type": "string", "maxLength": 30_000}, 4096), ({"type": "string", "minLength": 200_000},
                            4096), ({"type": "array", "items": {}, "minItems": 1, "maxItems": 3000}, 512)]:
        assert compiles(vocab, json_grammar(schema, context)), schema


def test_a_string_grammar_takes_exactly_the_lengths_allowed(llm):
    grammar = json_grammar({"type": "string", "minLength": 3, "maxLength": 250}, 512)  # 250: blocks of 16
    for length, taken in [(2, False), (3, True), (18, True), (101, True), (243, True), (250, True), (251, False)]:
        assert grammar_takes(llm, grammar, json.dumps("x" * length)) is taken, length
    grammar = json_grammar({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 130}, 512)
    for count, taken in [(0, False), (1, True), (129, True), (130, True), (131, False)]:
        assert grammar_takes(llm, grammar, json.dumps([7] * count)) is taken, count


# -- what the converter would assert on ----------------------------------------------------------------------

@pytest.mark.parametrize(("schema", "path", "reason"), [
    ({"type": "bogus"}, ".type", "unknown type 'bogus' (known: string, number, integer, boolean, object, array, null)"),
    ({"type": []}, ".type", "an empty list of types allows no value"),
    ({"enum": []}, ".enum", "must be a non-empty list (an empty enum allows no value)"),
    ({"anyOf": []}, ".anyOf", "must be a non-empty list of schemas"),
    ({"oneOf": [{"type": "string"}, 7]}, ".oneOf[1]", "a schema must be an object"),
    ({"properties": {"a": False}}, ".properties.a", "the schema `false` allows no value"),
    ({"properties": [1]}, ".properties", "must be an object of property schemas"),
    ({"required": "a"}, ".required", "must be a list of property names"),
    ({"$ref": "#/$defs/nope", "$defs": {}}, ".$ref", "'#/$defs/nope' points at nothing in this schema"),
    ({"$ref": "https://example.com/s.json"}, ".$ref",
     "'https://example.com/s.json': only references inside this schema (#/...) are supported"),
    ({"$ref": 3}, ".$ref", "must be a string (a reference such as #/$defs/name)"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}, ".$ref",
     "$ref cycle: #/$defs/a -> #/$defs/b -> #/$defs/a never reaches a schema"),
    ({"items": {"type": "string", "pattern": "abc"}}, ".items.pattern",
     "must match the whole string: start with ^ and end with $"),
    ({"enum": list(range(1001))}, ".enum", "1001 values; at most 1000"),
    ({"anyOf": [{"enum": list(range(800))}] * 3}, "", "2400 alternatives start here (enum values and anyOf/oneOf "
                                                     "branches, counted through $ref); at most 2000"),
])
def test_what_the_converter_cannot_take_is_refused_by_its_path(schema, path, reason):
    assert refusal(schema) == f"{WHERE}{path}: {reason}"


def test_a_refusal_names_the_part_and_never_echoes_the_schema():
    schema = {"type": "object", "description": "SECRET " * 5000,
              "properties": {"outer": {"type": "object", "properties": {"inner": {"type": "bogus"}}}}}
    message = refusal(schema)
    assert message.startswith(f"{WHERE}.properties.outer.properties.inner.type: unknown type 'bogus'")
    assert "SECRET" not in message and len(message) < 200
    deep: dict = {"type": "string"}
    for _ in range(70):
        deep = {"type": "array", "items": deep}
    assert "nests more than 64 levels deep" in refusal(deep)
    assert "more than 20000 values" in refusal({"enum": [list(range(100))] * 300})


def test_references_resolve_where_the_converter_alone_fails(vocab):
    # a root $ref beside $defs, "#" for the whole schema (a tree) and names that are no rule names
    for schema in [
        {"$ref": "#/$defs/Item", "$defs": {"Item": {"type": "object", "properties": {"id": {"type": "integer"}}}}},
        {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}},
        {"$ref": "#/$defs/My Model", "$defs": {"My Model": {"properties": {"x": {"$ref": "#/$defs/x"}}},
                                                "x": {"enum": [1, 2]}}},
    ]:
        assert compiles(vocab, json_grammar(schema, 512)), schema
    # a tool's own references point into its own parameters
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"enum": ["x", "y"]}}}}}
    assert compiles(vocab, tool_call_grammar([tool], "required", "hermes", context_length=512))
    with pytest.raises(EdgepackError, match=r"^tools\[0\]\.function\.parameters\.type: unknown type 'bogus'"):
        tool_call_grammar([{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
                          "required", "hermes", context_length=512)


# -- patterns -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "rewritten"), [
    ("^[a-z]{2,8}$", "^[a-z]{2,8}$"),
    (r"^\d{4}-\d{2}$", "^[0-9]{4}-[0-9]{2}$"),
    (r"^[\w.]+@\S+$", r"^[a-zA-Z0-9_.]+@[^ \t\n\r\x0B\x0C]+$"),
    (r"^v\.(?:x|y)*?$", r"^v[\x2E](x|y)*$"),
    ("^a]}$", r"^a\]\}$"),
    (r"^\(\[\]\)$", r"^\(\[\]\)$"),
])
def test_patterns_are_rewritten_into_the_subset_the_converter_takes(pattern, rewritten, vocab):
    assert checked_pattern(pattern) == rewritten
    assert compiles(vocab, json_grammar({"type": "string", "pattern": pattern}, 512))


@pytest.mark.parametrize(("pattern", "reason"), [
    ("^a{0,1500}$", "{0,1500}: at most 500 repetitions (for long strings use minLength/maxLength instead)"),
    ("^(a{0,500}){0,500}b{0,500}c{0,500}d{1}$", "the repetition counts add up to more than 2000"),
    ("^a{3,2}$", "{3,2}: the maximum is below the minimum"),
    ("^(?=a)a$", "(?...) groups (lookaround, named groups, flags) are not supported"),
    (r"^(a)\1$", r"the escape \1 is not supported"),
    ("^a^b$", "^ is supported only at the start (^) and end ($) of the pattern"),
    ("^(a$", "a ( is never closed"),
    ("^*a$", "* repeats nothing"),
    ("^a++$", "possessive quantifiers are not supported"),
    ("^[]$", "an empty class [] matches nothing"),
    ("^[a$", "a [ is never closed"),
])
def test_patterns_outside_that_subset_are_refused(pattern, reason):
    with pytest.raises(PatternError, match="^" + re.escape(reason)):
        checked_pattern(pattern)


# -- what a legitimate client sends is taken, and the largest grammar allowed compiles cheaply -----------------

def test_typical_schemas_are_taken(vocab):
    fields = {f"field_{i}": {"type": "string", "maxLength": 250 * (i + 1)} for i in range(20)}
    fields["kind"] = {"enum": [f"kind-{i}" for i in range(300)]}
    fields["when"] = {"type": "string", "format": "date-time"}
    fields["tags"] = {"type": "array", "items": {"type": "string", "pattern": r"^[a-z0-9-]{1,64}$"}, "maxItems": 20}
    schema = {"type": "object", "properties": fields, "required": list(fields)}
    assert compiles(vocab, json_grammar(schema, 4096))


@pytest.mark.parametrize("make", [
    lambda i: {"type": "string", "maxLength": 10**9 + i, "minLength": 1000 + i},  # counts: repeated elements
    lambda i: {"type": "string", "pattern": "^[a-z]{0,500}-[0-9]{500}x{500}(ab){0,500}$"},  # nested groups: bytes
    lambda i: {"enum": [j * 1000 + i for j in range(1000)]},  # alternatives
], ids=["counts", "patterns", "enums"])
def test_the_largest_grammar_allowed_compiles_well_under_100_ms(make, vocab):
    """Add fields until the grammar is refused as too large; the last one taken compiles in < 50 ms (measured
    ~20 ms at most on a 2-core CI machine)."""
    fields, largest = {}, None
    for i in range(200):
        fields[f"f{i}"] = make(i)
        try:
            largest = schema_grammar(bounded_schema({"properties": dict(fields)}, 32_768, WHERE), WHERE)
        except EdgepackError as exc:
            assert "larger than this server compiles" in str(exc) or "values" in str(exc)
            break
    else:
        pytest.fail("never refused")
    fastest = min(_compile_seconds(vocab, largest) for _ in range(3))
    assert fastest < 0.05, f"{fastest * 1000:.1f} ms"


def _compile_seconds(vocab, grammar: str) -> float:
    start = time.perf_counter()
    assert compiles(vocab, grammar)
    return time.perf_counter() - start
