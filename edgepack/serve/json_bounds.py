"""A request body's JSON counted before it is parsed: parsed, every JSON value becomes a Python object of a few
hundred bytes, so 4 MiB of `{"role":"user","content":"a"}` would take over 100 MiB for a moment (and glibc keeps
much of it). The values are counted on the raw bytes (strings skipped), and a body with more than MAX_JSON_VALUES is
refused with a 413 before anything is built from it."""

from __future__ import annotations

from edgepack.core.errors import ApiError

# ~6 MiB of Python objects at most (a schema is refused past 20,000 values anyway); a legitimate request holds fewer
# (4,096 chat messages: ~12,000 values; a
# tool with a 200-field schema: a few thousand)
MAX_JSON_VALUES = 20_000
_KEPT = b'",[{'
_DROPPED = bytes(byte for byte in range(256) if byte not in _KEPT)


def json_values_at_most(raw: bytes) -> int:
    """An upper bound on the number of values in the JSON text `raw` (exact for valid JSON but for an empty array or
    object, which counts one more): every value but the first follows a comma or opens an array or object. Written
    with bytes' own C loops, never an object per string: a regex over 270,000 strings cost 25 MiB for a moment."""
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # escaped backslashes first: they pair from the left
    delimiters = unescaped.translate(None, _DROPPED)  # quotes, commas and brackets only
    outside_strings = b"".join(delimiters.split(b'"')[0::2])
    return outside_strings.count(b",") + outside_strings.count(b"[") + outside_strings.count(b"{") + 1


def check_json_size(raw: bytes) -> None:
    values = json_values_at_most(raw)
    if values > MAX_JSON_VALUES:
        raise ApiError(413, f"the request body holds {values} JSON values; this server takes at most "
                            f"{MAX_JSON_VALUES} in one request", code="request_too_large")
