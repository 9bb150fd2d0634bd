"""Task accuracy: a JSONL of prompts and expected answers, answered by greedy generation.

Each line: {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}, "expected": the answer,
"match": "exact" (the whole answer, trimmed), "contains" (case-insensitive substring, the default) or "json"
(the first JSON value in the answer equals `expected`), and optionally "max_tokens" (default 64).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.core.errors import EdgepackError
from runtimes.base import GenerationOptions

MATCHES = ("exact", "contains", "json")


@dataclass(frozen=True)
class Task:
    line: int
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    expected: Any
    match: str
    max_tokens: int


def load_tasks(path: Path) -> list[Task]:
    if not Path(path).is_file():
        raise EdgepackError(f"tasks file {path} does not exist; expected JSONL with prompt/messages and expected")
    tasks = []
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise EdgepackError(f"{where} is not valid JSON: {exc.msg}") from exc
        if not isinstance(entry, dict):
            raise EdgepackError(f"{where}: each line must be a JSON object")
        if ("prompt" in entry) == ("messages" in entry):
            raise EdgepackError(f"{where}: give exactly one of \"prompt\" (a string) or \"messages\" (a list)")
        if "expected" not in entry:
            raise EdgepackError(f"{where}: \"expected\" is missing")
        match = entry.get("match", "contains")
        if match not in MATCHES:
            raise EdgepackError(f"{where}: match {match!r} is not one of {', '.join(MATCHES)}")
        messages = entry.get("messages")
        if messages is not None and not (isinstance(messages, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise EdgepackError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} strings")
        if "prompt" in entry and not isinstance(entry["prompt"], str):
            raise EdgepackError(f"{where}: \"prompt\" must be a string")
        tasks.append(Task(line=number, prompt=entry.get("prompt"),
                          messages=tuple(messages) if messages is not None else None,
                          expected=entry["expected"], match=match, max_tokens=int(entry.get("max_tokens", 64))))
    if not tasks:
        raise EdgepackError(f"tasks file {path} has no tasks")
    return tasks


def is_correct(answer: str, task: Task) -> bool:
    if task.match == "exact":
        return answer.strip() == str(task.expected).strip()
    if task.match == "contains":
        return str(task.expected).lower() in answer.lower()
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


def task_accuracy(runtime, tasks: list[Task]) -> float:
    correct = 0
    for task in tasks:
        if task.messages is not None:
            prompt_ids = runtime.chat_prompt_ids(list(task.messages))
        else:
            prompt_ids = runtime.tokenize(task.prompt)
        answer = runtime.complete(prompt_ids, GenerationOptions(max_tokens=task.max_tokens)).text
        correct += is_correct(answer, task)
    return correct / len(tasks)
