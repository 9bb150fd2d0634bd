"""Prompts with expected answers: the user's `--tasks FILE` and edgepack's built-in behaviour prompts.

Each JSONL line: {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}, "expected": the answer,
"match": how an answer is checked, and optionally "max_tokens" (default 64), "id" and "category". Matches:
- "contains" (the default): the answer contains `expected` (or any of a list of strings), case-insensitive;
- "number": the last number in the answer ("1,250" reads as 1250) equals `expected` (small models restate the
  question before the result: "7 + 5 = 12");
- "json": the first JSON value in the answer equals `expected`;
- "exact": the whole answer, trimmed, is `expected`.
The built-in prompts may leave out "expected" (a summary has no one right answer): they are compared with the
reference's answers but not checked.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.core.errors import EdgepackError

MATCHES = ("contains", "number", "json", "exact")
BUILTIN_PROMPTS = Path(__file__).with_name("behaviour_prompts.jsonl")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Task:
    line: int
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    expected: Any  # None: nothing to check
    match: str | None
    max_tokens: int
    id: str = ""
    category: str = ""
    builtin: bool = False  # one of edgepack's behaviour prompts (not the user's --tasks)

    @property
    def checkable(self) -> bool:
        return self.match is not None

    @property
    def question(self) -> str:
        """The last thing the user said: what a report shows as the prompt."""
        if self.messages is None:
            return self.prompt or ""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def load_tasks(path: Path) -> list[Task]:
    """The user's tasks file: every line needs an expected answer."""
    if not Path(path).is_file():
        raise EdgepackError(f"tasks file {path} does not exist; expected JSONL with prompt/messages and expected")
    tasks = _parse_lines(Path(path), require_expected=True, builtin=False)
    if not tasks:
        raise EdgepackError(f"tasks file {path} has no tasks")
    return tasks


def builtin_tasks() -> list[Task]:
    """edgepack's behaviour prompts for chat models (all written as chat messages)."""
    return _parse_lines(BUILTIN_PROMPTS, require_expected=False, builtin=True)


def tasks_digest(tasks: list[Task] | tuple[Task, ...]) -> str:
    return hashlib.sha256(json.dumps([asdict(t) for t in tasks], sort_keys=True).encode()).hexdigest()


def _parse_lines(path: Path, require_expected: bool, builtin: bool) -> list[Task]:
    tasks = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if raw.strip():
            tasks.append(_parse_task(raw, f"{path}:{number}", number, require_expected, builtin))
    return tasks


def _parse_task(raw: str, where: str, number: int, require_expected: bool, builtin: bool) -> Task:
    try:
        entry = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise EdgepackError(f"{where} is not valid JSON: {exc.msg}") from exc
    if not isinstance(entry, dict):
        raise EdgepackError(f"{where}: each line must be a JSON object")
    if ("prompt" in entry) == ("messages" in entry):
        raise EdgepackError(f"{where}: give exactly one of \"prompt\" (a string) or \"messages\" (a list)")
    if require_expected and "expected" not in entry:
        raise EdgepackError(f"{where}: \"expected\" is missing")
    match = entry.get("match", "contains") if "expected" in entry else None
    if match is not None and match not in MATCHES:
        raise EdgepackError(f"{where}: match {match!r} is not one of {', '.join(MATCHES)}")
    expected = entry.get("expected")
    if match == "contains" and not (isinstance(expected, str) or (
            isinstance(expected, list) and expected and all(isinstance(e, str) for e in expected))):
        raise EdgepackError(f"{where}: a \"contains\" check needs \"expected\" as a string or a list of strings")
    if match == "number" and (isinstance(expected, bool) or not isinstance(expected, (int, float))):
        raise EdgepackError(f"{where}: a \"number\" check needs \"expected\" as a number")
    messages = entry.get("messages")
    if messages is not None and not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise EdgepackError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} strings")
    if "prompt" in entry and not isinstance(entry["prompt"], str):
        raise EdgepackError(f"{where}: \"prompt\" must be a string")
    max_tokens = entry.get("max_tokens", 64)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise EdgepackError(f"{where}: \"max_tokens\" must be a positive whole number")
    return Task(line=number, prompt=entry.get("prompt"), messages=tuple(messages) if messages is not None else None,
                expected=expected, match=match, max_tokens=max_tokens, id=str(entry.get("id", f"line-{number}")),
                category=str(entry.get("category", "")), builtin=builtin)


def is_correct(answer: str, task: Task) -> bool | None:
    """Whether `answer` is right; None when the task has nothing to check."""
    if task.match is None:
        return None
    if task.match == "exact":
        return answer.strip() == str(task.expected).strip()
    if task.match == "contains":
        options = task.expected if isinstance(task.expected, list) else [task.expected]
        return any(str(option).lower() in answer.lower() for option in options)
    if task.match == "number":
        found = _NUMBER.findall(answer)
        return bool(found) and math.isclose(float(found[-1].replace(",", "")), float(task.expected),
                                            rel_tol=1e-9, abs_tol=1e-9)
    value = first_json_value(answer)
    return value is not _NOTHING and value == task.expected


_NOTHING = object()


def first_json_value(text: str) -> Any:
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char in "{[\"-0123456789tfn":
            try:
                return decoder.raw_decode(text, start)[0]
            except json.JSONDecodeError:
                continue
    return _NOTHING
