"""A client's JSON Schema checked and bounded before it becomes a llama.cpp grammar (edgepack.serve.structured).

llama-cpp-python's converter asserts on what it does not take, writes repetitions as nested groups (llama.cpp's
parser recurses once per group: ~18,000 levels overflow an 8 MiB thread stack) and writes `minLength: N` as N
copies of a rule (30,000,000 cost a gigabyte). Here every part the converter will read is checked first, each
refusal an EdgepackError naming the JSON path of the part at fault (never the whole schema):

- the document: at most MAX_DEPTH nested containers and MAX_NODES values;
- `$ref`: only local ("#" or "#/a/b"), to a schema that exists, not a chain of references that comes back to itself;
- `type` (the seven JSON types), `enum` and `anyOf`/`oneOf` (not empty), sub-schemas (objects, or `true`);
- counts (`minLength`/`maxLength`, `minItems`/`maxItems`, `minProperties`/`maxProperties`): a minimum more characters
  than the context could hold is refused; a maximum far above what it holds is lowered (a shorter answer still
  validates);
- `pattern`: the regex subset the converter takes (schema_patterns), its repetition counts bounded;
- alternatives that start at one position (enum values, union branches): at most MAX_UNION_WIDTH, since llama.cpp
  keeps a parse stack per alternative and its dedup is quadratic in them (16,000 values: 0.3 s to compile).
"""

from __future__ import annotations

import json
from typing import Any

from edgepack.core.errors import EdgepackError
from edgepack.serve.schema_patterns import PatternError, checked_pattern

JSON_TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")
# what `true` (any value) becomes: the converter reads `{}` as any object, and `true` not at all
ANY_VALUE: dict[str, Any] = {"type": ["string", "number", "boolean", "object", "array", "null"]}

MAX_DEPTH = 64  # nested objects and arrays in the schema document (a sub-schema level takes two: properties, name)
MAX_NODES = 20_000  # values in the schema document
MAX_PROPERTIES = 256  # in one object (the converter recurses once per optional property)
MAX_ENUM_VALUES = 1_000
MAX_UNION_WIDTH = 2_000  # alternatives at one position: enum values, anyOf/oneOf branches (through $ref)
# No token of a vocabulary we know spells more characters than this: a context of N tokens holds at most
# N * MAX_CHARS_PER_TOKEN characters (and as many items, each of which takes one at least). A minimum above that
# is refused
MAX_CHARS_PER_TOKEN = 256
# A maximum is lowered to N * this: no answer that fits a context comes near it (text averages ~4 characters a
# token), and the grammar of a count costs ~4 * sqrt(count) rules
CLAMP_CHARS_PER_TOKEN = 16
# structured.py writes a count of n as blocks of ~sqrt(n) (llama.cpp takes repetition counts up to 2,000)
MAX_COUNT = 2_000 * 2_000
COUNT_KEYWORDS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"))


def bounded_schema(schema: Any, context_length: int, where: str) -> dict[str, Any]:
    """A copy of `schema` that the converter takes and whose grammar stays small, for a model whose context holds
    `context_length` tokens; an EdgepackError naming the part (`where` + its JSON path) that cannot be used."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise EdgepackError(f"{where}: a JSON Schema must be an object")
    refs = _scan_document(schema, where)
    copy = json.loads(json.dumps(schema))  # safe now: the depth is bounded
    walk = _SchemaWalk(copy, context_length, where)
    for path, ref in refs:
        walk.target(ref, path)  # every $ref, wherever it is: the converter resolves them all
    try:
        walk.visit(copy, "")
    except RecursionError:
        raise EdgepackError(f"{where}: the schema nests too deeply (counting what its $refs bring in)") from None
    return copy


def rebase_refs(schema: dict[str, Any], key: str) -> None:
    """Point every `#...` reference in `schema` (in place) at `#/key...`: for a schema placed under `key` of a
    larger document (the tools of one request share one)."""
    stack: list[Any] = [schema]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            ref = value.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                value["$ref"] = f"#/{key}{ref[1:]}"
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _scan_document(schema: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """Check the document's size and depth without recursing; every ($ref path, reference) in it."""
    refs, count = [], 0
    stack: list[tuple[Any, str, int]] = [(schema, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise EdgepackError(f"{where}: the schema has more than {MAX_NODES} values")
        if depth > MAX_DEPTH and isinstance(value, dict | list):
            raise EdgepackError(f"{where}{path}: the schema nests more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            if "$ref" in value:
                if not isinstance(value["$ref"], str):
                    raise EdgepackError(f"{where}{path}.$ref: must be a string (a reference such as #/$defs/name)")
                refs.append((f"{path}.$ref", value["$ref"]))
            stack.extend((item, f"{path}.{_key(key)}", depth + 1) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))
    return refs


def _key(key: str) -> str:
    return key if len(key) <= 40 else key[:40] + "..."


def _count(value: Any) -> int | None:
    """A count keyword's value as an int; None when it is not a whole number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if value >= 0 else None


class _SchemaWalk:
    """Visits each sub-schema the converter will read once (a recursive schema's are not visited again), checking
    it and bounding it in place; `visit` returns how many alternatives the schema starts with."""

    def __init__(self, root: dict[str, Any], context_length: int, where: str) -> None:
        self.root, self.where, self.context_length = root, where, context_length
        self.most_chars = min(context_length * MAX_CHARS_PER_TOKEN, MAX_COUNT)
        self.clamp = min(context_length * CLAMP_CHARS_PER_TOKEN, MAX_COUNT)
        self.widths: dict[int, int] = {}

    def fail(self, path: str, message: str) -> EdgepackError:
        return EdgepackError(f"{self.where}{path}: {message}")

    # -- references -------------------------------------------------------------------------------

    def target(self, ref: str, path: str) -> tuple[dict[str, Any], str]:
        """The schema `ref` points at and its path; refused when the reference is not local, points at nothing, or
        starts a chain of references that comes back to itself (a rule that would be only itself)."""
        chain = [ref]
        node = self._resolve(ref, path)
        while isinstance(node.get("$ref"), str):
            if node["$ref"] in chain:
                raise self.fail(path, f"$ref cycle: {' -> '.join(chain + [node['$ref']])} never reaches a schema")
            chain.append(node["$ref"])
            node = self._resolve(node["$ref"], path)
        return node, "".join(f".{_key(part)}" for part in chain[-1][2:].split("/") if part)

    def _resolve(self, ref: str, path: str) -> dict[str, Any]:
        if ref != "#" and not ref.startswith("#/"):
            raise self.fail(path, f"{ref[:80]!r}: only references inside this schema (#/...) are supported")
        parent: Any = None
        node: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            if not isinstance(node, dict) or part not in node:
                raise self.fail(path, f"{ref[:80]!r} points at nothing in this schema")
            parent, node = node, node[part]
        if node is True:  # `true` where the converter will look: any value
            node = parent[ref.rsplit("/", 1)[-1]] = json.loads(json.dumps(ANY_VALUE))
        if not isinstance(node, dict):
            raise self.fail(path, f"{ref[:80]!r} points at something that is not a schema")
        return node

    # -- schemas ----------------------------------------------------------------------------------

    def visit(self, schema: dict[str, Any], path: str) -> int:
        if id(schema) in self.widths:
            return self.widths[id(schema)]
        self.widths[id(schema)] = 1  # while it is visited: a recursive schema reaches itself
        width = self._check(schema, path)
        if width > MAX_UNION_WIDTH:
            raise self.fail(path, f"{width} alternatives start here (enum values and anyOf/oneOf branches, counted "
                                  f"through $ref); at most {MAX_UNION_WIDTH}")
        self.widths[id(schema)] = width
        return width

    def _check(self, schema: dict[str, Any], path: str) -> int:
        if "$ref" in schema:  # the converter reads nothing else beside a $ref
            return self.visit(*self.target(schema["$ref"], f"{path}.$ref"))
        self._check_scalars(schema, path)
        self._visit_children(schema, path)
        for low, high in COUNT_KEYWORDS:
            self._bound_counts(schema, low, high, path)
        return self._width(schema, path)

    def _check_scalars(self, schema: dict[str, Any], path: str) -> None:
        kind = schema.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if "type" in schema else []
        if isinstance(kind, list) and not kind:
            raise self.fail(f"{path}.type", "an empty list of types allows no value")
        for one in kinds:
            if one not in JSON_TYPES:
                raise self.fail(f"{path}.type", f"unknown type {str(one)[:40]!r} (known: {', '.join(JSON_TYPES)})")
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail(f"{path}.enum", "must be a non-empty list (an empty enum allows no value)")
            if len(values) > MAX_ENUM_VALUES:
                raise self.fail(f"{path}.enum", f"{len(values)} values; at most {MAX_ENUM_VALUES}")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise self.fail(f"{path}.required", "must be a list of property names")
        if "format" in schema and not isinstance(schema["format"], str):
            raise self.fail(f"{path}.format", "must be a string")
        if "pattern" in schema:
            try:
                schema["pattern"] = checked_pattern(schema["pattern"])
            except PatternError as exc:
                raise self.fail(f"{path}.pattern", str(exc)) from None

    def _visit_children(self, schema: dict[str, Any], path: str) -> None:
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                self._visit_list(schema, key, path, allow_empty=key == "allOf")
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise self.fail(f"{path}.properties", "must be an object of property schemas")
        if len(properties) > MAX_PROPERTIES:
            raise self.fail(f"{path}.properties", f"{len(properties)} properties; at most {MAX_PROPERTIES}")
        for name in properties:
            self._visit_at(properties, name, f"{path}.properties.{_key(name)}")
        if isinstance(schema.get("additionalProperties"), dict):
            self._visit_at(schema, "additionalProperties", f"{path}.additionalProperties")
        if "items" in schema:
            if isinstance(schema["items"], list):
                self._visit_list(schema, "items", path, allow_empty=False)
            else:
                self._visit_at(schema, "items", f"{path}.items", empty_means_any=True)
        if "prefixItems" in schema:
            self._visit_list(schema, "prefixItems", path, allow_empty=True)

    def _visit_list(self, schema: dict[str, Any], key: str, path: str, allow_empty: bool) -> None:
        branches = schema[key]
        if not isinstance(branches, list) or (not branches and not allow_empty):
            raise self.fail(f"{path}.{key}", "must be a non-empty list of schemas")
        for index in range(len(branches)):
            self._visit_at(branches, index, f"{path}.{key}[{index}]")

    def _visit_at(self, parent: dict | list, key: Any, path: str, empty_means_any: bool = False) -> int:
        """Visit parent[key] as a schema; `true` (and, where the converter would fail on it, `{}`) becomes
        ANY_VALUE."""
        schema = parent[key]
        if schema is True or (empty_means_any and schema == {}):
            schema = parent[key] = json.loads(json.dumps(ANY_VALUE))
        if schema is False:
            raise self.fail(path, "the schema `false` allows no value")
        if not isinstance(schema, dict):
            raise self.fail(path, "a schema must be an object")
        return self.visit(schema, path)

    def _width(self, schema: dict[str, Any], path: str) -> int:
        """Alternatives the schema starts with, as the converter writes it (anyOf/oneOf first, then a list of
        types, then an enum)."""
        for key in ("oneOf", "anyOf"):
            if schema.get(key):
                return sum(self.visit(branch, f"{path}.{key}[{index}]") for index, branch in enumerate(schema[key]))
        if isinstance(schema.get("type"), list):
            return len(schema["type"])
        return len(schema["enum"]) if "enum" in schema and "const" not in schema else 1

    def _bound_counts(self, schema: dict[str, Any], low_key: str, high_key: str, path: str) -> None:
        """A minimum the context cannot hold is refused; a maximum above `clamp` is lowered to it (or to the
        minimum)."""
        low = self._count_at(schema, low_key, path)
        high = self._count_at(schema, high_key, path)
        if low is not None and low > self.most_chars:
            if low > self.context_length * MAX_CHARS_PER_TOKEN:
                raise self.fail(f"{path}.{low_key}", f"{low} cannot fit in the model's context of "
                                                     f"{self.context_length} tokens")
            raise self.fail(f"{path}.{low_key}", f"{low} is more than this server writes a grammar for ({MAX_COUNT})")
        if high is None:
            return
        if low is not None and high < low:
            raise self.fail(f"{path}.{high_key}", f"{high} is below {low_key} {low}: no value fits")
        schema[high_key] = min(high, max(self.clamp, low or 0))

    def _count_at(self, schema: dict[str, Any], key: str, path: str) -> int | None:
        if key not in schema:
            return None
        count = _count(schema[key])
        if count is None:
            raise self.fail(f"{path}.{key}", "must be a whole number, 0 or more")
        schema[key] = count
        return count
