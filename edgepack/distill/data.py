"""Training data for distillation: files read with `datasets`, turned into token sequences.

Accepted: plain text (`.txt`, `.md`: each file one document), JSON Lines or JSON (`.jsonl`, `.json`) whose rows hold
`{"text": ...}` or `{"messages": [...]}` (chat messages, rendered with the tokenizer's chat template). Documents are
joined with the end-of-text token and cut into sequences of `seq_len` tokens, every position scored.

Prompt files (`--prompts`, sequence-level distillation) are JSON Lines of `{"prompt": ...}` or `{"messages": [...]}`
whose last message is the user's; edgepack's own set (`distill_prompts.jsonl`, written for edgepack) is used when
none is given.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import read_jsonl, sha256_file

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
BUILTIN_PROMPTS = Path(__file__).with_name("distill_prompts.jsonl")


@dataclass(frozen=True)
class Document:
    """One training document: plain text, or chat messages to render with the chat template."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None


@dataclass(frozen=True)
class TrainingSequence:
    """Token ids and, per position, whether its prediction of the next token is trained on."""

    input_ids: tuple[int, ...]
    scored: tuple[bool, ...]  # len(input_ids) - 1 entries: position i predicts input_ids[i + 1]

    @property
    def scored_count(self) -> int:
        return sum(self.scored)


def files_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def read_documents(paths: list[Path]) -> list[Document]:
    """Every document of every file, in order; a clear error for a missing, unsupported or empty file."""
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar, set_verbosity_error

    disable_progress_bar()
    set_verbosity_error()
    documents: list[Document] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise EdgepackError(f"training data {path} does not exist")
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            rows = load_dataset("text", data_files=str(path), sample_by="document", split="train",
                                keep_in_memory=True)
            found = [Document(text=row["text"]) for row in rows if row["text"].strip()]
        elif suffix in JSON_SUFFIXES:
            try:
                rows = load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
            except Exception as exc:  # datasets raises its own types for malformed JSON
                raise EdgepackError(f"training data {path} is not valid JSON Lines: {exc}") from exc
            found = [_document_from_row(row, path, number) for number, row in enumerate(rows, 1)]
        else:
            raise EdgepackError(f"training data {path}: unsupported file type {suffix or '(none)'}; accepted: "
                                f"{', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)}")
        if not found:
            raise EdgepackError(f"training data {path} holds no text")
        documents.extend(found)
    return documents


def _document_from_row(row: dict, path: Path, number: int) -> Document:
    if isinstance(row.get("text"), str) and row["text"].strip():
        return Document(text=row["text"])
    messages = row.get("messages")
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return Document(messages=tuple({"role": m["role"], "content": m["content"]} for m in messages))
    raise EdgepackError(f"{path} row {number}: needs a non-empty \"text\" string or \"messages\" "
                        "(a list of {\"role\", \"content\"})")


def read_prompts(path: Path | None) -> list[tuple[dict, ...]]:
    """Prompts as chat messages, ending with the user's turn; edgepack's built-in set when `path` is None."""
    path = Path(path) if path is not None else BUILTIN_PROMPTS
    prompts = []
    for number, row in read_jsonl(path, "prompt file"):
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            prompts.append(({"role": "user", "content": row["prompt"]},))
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
                and messages[-1].get("role") == "user"):
            raise EdgepackError(f"{path}:{number}: needs \"prompt\" (a string) or \"messages\" ending with "
                                "the user's turn")
        prompts.append(tuple({"role": m["role"], "content": m["content"]} for m in messages))
    if not prompts:
        raise EdgepackError(f"prompt file {path} holds no prompts")
    return prompts


def document_ids(tokenizer, document: Document) -> list[int]:
    if document.messages is not None:
        if not tokenizer.chat_template:
            raise EdgepackError("the training data has chat messages but the tokenizer has no chat template; "
                                "give plain {\"text\"} rows instead")
        text = tokenizer.apply_chat_template(list(document.messages), tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(document.text, add_special_tokens=False)["input_ids"]


def pack_documents(tokenizer, documents: list[Document], seq_len: int) -> list[TrainingSequence]:
    """Documents joined by the end-of-text token and cut into sequences of `seq_len` tokens (each starting with
    the tokens the tokenizer puts at a text's start, e.g. BOS). A last piece shorter than a quarter of `seq_len` is
    dropped unless it is all there is."""
    start = tokenizer("", add_special_tokens=True)["input_ids"]
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for document in documents:
        stream.extend(document_ids(tokenizer, document) + separator)
    step = seq_len - len(start)
    if step < 2:
        raise EdgepackError(f"seq-len {seq_len} leaves no room for text")
    pieces = [stream[i:i + step] for i in range(0, len(stream), step)]
    if len(pieces) > 1 and len(pieces[-1]) < step // 4:
        pieces.pop()
    sequences = [start + piece for piece in pieces if len(start + piece) >= 2]
    return [TrainingSequence(tuple(ids), (True,) * (len(ids) - 1)) for ids in sequences]


def answer_sequence(prompt_ids: list[int], answer_ids: list[int]) -> TrainingSequence:
    """A prompt and an answer: only the positions that predict answer tokens are trained on."""
    ids = list(prompt_ids) + list(answer_ids)
    scored = [False] * (len(prompt_ids) - 1) + [True] * len(answer_ids)
    return TrainingSequence(tuple(ids), tuple(scored))


def sequences_digest(sequences: list[TrainingSequence]) -> str:
    digest = hashlib.sha256()
    for sequence in sequences:
        digest.update(json.dumps([sequence.input_ids, sequence.scored]).encode())
    return digest.hexdigest()
