"""A JSON Schema `pattern` checked against the regex subset llama-cpp-python's converter takes, and rewritten where a
common form can be said in that subset.

The converter needs `^...$` (the grammar matches the whole string), has no lookaround, backreferences or flags, and
passes escapes through to GBNF, which knows only \\t \\n \\r \\xHH \\uHHHH and a few punctuation marks. Rewritten here:
`\\d \\w \\s` (and `\\D \\W \\S` outside a class) as classes, other escaped punctuation as `\\xHH`, `(?:` as `(`, lazy
quantifiers as greedy ones (a whole-string match accepts the same strings either way). A quantifier {m,n} becomes
n - m nested groups, and llama.cpp's parser recurses once per group: counts are held to MAX_REPEAT (measured: this
build's parser survives ~18,000 levels on an 8 MiB thread stack), their sum to REPEAT_BUDGET.
"""

from __future__ import annotations

import re

MAX_PATTERN_CHARS = 1_000
MAX_GROUP_DEPTH = 16
MAX_REPEAT = 500
REPEAT_BUDGET = 2_000  # the counts of all quantifiers of one pattern together

_CLASS_OF = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r\\x0B\\x0C"}
_CONVERTER_ESCAPES = set("[]()|{}*+?")  # the converter turns \X into the character X
_GBNF_ESCAPES = set('tnr\\"[]-')  # \X that GBNF reads as it is (besides \xHH and \uHHHH)
_QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")


class PatternError(ValueError):
    """A pattern the converter cannot take; the message says what and where."""


def checked_pattern(pattern: object) -> str:
    """`pattern` as the converter should get it; a PatternError when it uses what the converter does not take."""
    if not isinstance(pattern, str):
        raise PatternError("must be a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"{len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    if not (pattern.startswith("^") and pattern.endswith("$")) or _escaped_at(pattern, len(pattern) - 1):
        raise PatternError("must match the whole string: start with ^ and end with $")
    return "^" + _PatternScan(pattern[1:-1]).rewritten() + "$"


def _escaped_at(text: str, index: int) -> bool:
    backslashes = len(text[:index]) - len(text[:index].rstrip("\\"))
    return backslashes % 2 == 1


class _PatternScan:
    def __init__(self, body: str) -> None:
        self.body, self.at, self.out = body, 0, []
        self.depth, self.repeats = 0, 0
        self.after_atom = False  # whether a quantifier may follow

    def fail(self, message: str) -> PatternError:
        return PatternError(f"{message} (at character {self.at + 1} of the pattern)")

    def rewritten(self) -> str:
        while self.at < len(self.body):
            self._step(self.body[self.at])
        if self.depth:
            raise self.fail("a ( is never closed")
        return "".join(self.out)

    def _step(self, char: str) -> None:
        if char == "\\":
            self._emit_atom(self._escape_outside())
        elif char == "[":
            self._emit_atom(self._char_class())
        elif char == "(":
            self._open_group()
        elif char == ")":
            if self.depth == 0:
                raise self.fail("a ) closes no (")
            self.depth -= 1
            self._emit_atom(")", 1)
        elif char in "*+?{":
            self._quantifier(char)
        elif char in "^$":
            raise self.fail(f"{char} is supported only at the start (^) and end ($) of the pattern")
        elif char == "|":
            self.out.append("|")
            self.at += 1
            self.after_atom = False
        elif char in "]}":  # a character here; the converter would loop forever on it unescaped
            self._emit_atom("\\" + char, 1)
        else:
            self._emit_atom(char, 1)

    def _emit_atom(self, text: str, consumed: int = 0) -> None:
        self.out.append(text)
        self.at += consumed
        self.after_atom = True

    def _open_group(self) -> None:
        if self.body.startswith("(?", self.at):
            if not self.body.startswith("(?:", self.at):
                raise self.fail("(?...) groups (lookaround, named groups, flags) are not supported")
            self.at += 2  # a non-capturing group is a group here
        self.depth += 1
        if self.depth > MAX_GROUP_DEPTH:
            raise self.fail(f"groups nest more than {MAX_GROUP_DEPTH} deep")
        self.out.append("(")
        self.at += 1
        self.after_atom = False

    def _quantifier(self, char: str) -> None:
        if not self.after_atom:
            raise self.fail(f"{char} repeats nothing")
        if char == "{":
            found = _QUANTIFIER.match(self.body, self.at)
            if found is None:
                raise self.fail("{ starts no {m}, {m,} or {m,n} repetition")
            self._count_repeats(found)
            self.out.append(found.group(0))
            self.at = found.end()
        else:
            self.out.append(char)
            self.at += 1
        if self.body.startswith("?", self.at):  # lazy: the same strings match the whole pattern
            self.at += 1
        elif self.body.startswith("+", self.at):
            raise self.fail("possessive quantifiers are not supported")
        self.after_atom = False

    def _count_repeats(self, found: re.Match) -> None:
        low = int(found.group(1))
        high = low if found.group(2) is None else int(found.group(3)) if found.group(3) else None
        if high is not None and high < low:
            raise self.fail(f"{found.group(0)}: the maximum is below the minimum")
        largest = max(low, high or 0)
        if largest > MAX_REPEAT:
            raise self.fail(f"{found.group(0)}: at most {MAX_REPEAT} repetitions (for long strings use "
                            "minLength/maxLength instead)")
        self.repeats += largest
        if self.repeats > REPEAT_BUDGET:
            raise self.fail(f"the repetition counts add up to more than {REPEAT_BUDGET}")

    def _escape_outside(self) -> str:
        """An escape outside a class, as the converter should get it; moves past it."""
        letter = self._escape_letter()
        if letter in _CLASS_OF:
            return f"[{_CLASS_OF[letter]}]"
        if letter.lower() in _CLASS_OF:
            return f"[^{_CLASS_OF[letter.lower()]}]"
        if letter in _CONVERTER_ESCAPES or letter in _GBNF_ESCAPES:
            return "\\" + letter
        return self._hex_or_plain(letter, in_class=False)

    def _escape_letter(self) -> str:
        if self.at + 1 >= len(self.body):
            raise self.fail("the pattern ends with a lone \\")
        letter = self.body[self.at + 1]
        self.at += 2
        return letter

    def _hex_or_plain(self, letter: str, in_class: bool) -> str:
        """\\xHH and \\uHHHH as they are, other punctuation as \\xHH; letters and digits (\\b, backreferences):
        refused."""
        if letter in "xu":
            digits = 2 if letter == "x" else 4
            code = self.body[self.at:self.at + digits]
            if len(code) != digits or not all(c in "0123456789abcdefABCDEF" for c in code):
                raise self.fail(f"\\{letter} needs {digits} hex digits")
            self.at += digits
            return f"\\{letter}{code}"
        if letter.isalnum() or ord(letter) > 0x7E:
            raise self.fail(f"the escape \\{letter} is not supported")
        hexed = f"\\x{ord(letter):02X}"
        return hexed if in_class else f"[{hexed}]"

    def _char_class(self) -> str:
        """A [...] class (the converter copies it into the grammar as it is); moves past it."""
        start, parts = self.at, ["["]
        self.at += 1
        if self.body.startswith("^", self.at):
            parts.append("^")
            self.at += 1
        while self.at < len(self.body) and self.body[self.at] != "]":
            if self.body[self.at] != "\\":
                parts.append(self.body[self.at])
                self.at += 1
                continue
            letter = self._escape_letter()
            if letter in _CLASS_OF:
                parts.append(_CLASS_OF[letter])
            elif letter.lower() in _CLASS_OF:
                raise self.fail(f"\\{letter} inside [...] is not supported")
            elif letter in _GBNF_ESCAPES:
                parts.append("\\" + letter)
            else:
                parts.append(self._hex_or_plain(letter, in_class=True))
        if self.at >= len(self.body):
            self.at = start
            raise self.fail("a [ is never closed")
        if len(parts) == 1 or parts == ["[", "^"]:
            raise self.fail("an empty class [] matches nothing")
        self.at += 1
        return "".join(parts) + "]"
