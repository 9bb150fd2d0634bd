"""Behaviour checks: what a chat model answers, not only how well it reads prose.

The reference answers every prompt greedily (cached per model, prompt set and context). Each variant is then
teacher-forced on the reference's answer: KL divergence and same-top-1 on the answer tokens only, and the first
answer token where the variant's most likely token is not the reference's. A variant's greedy answer is the
reference's exactly when there is no such token, so only the prompts that diverge are generated again, to see
what the variant answers and whether it is right. Correctness is compared pairwise with McNemar's exact test.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.core.artifacts import AnswerDifference, BehaviourQuality
from edgepack.core.cache import cache_root
from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import atomic_output_file
from edgepack.core.progress import progress_bar
from edgepack.quality.metrics import ReferencePositions, reference_positions, score_positions
from edgepack.quality.tasks import Task, is_correct, tasks_digest
from runtimes.base import GenerationOptions
from runtimes.token_stream import IncrementalDecoder

CACHE_FORMAT = 1
DIFFERENCES_SHOWN = 3
BOOTSTRAP_RESAMPLES = 2000
# prompts the reference answers at once: on the demo, 32 took 60 s for the built-in set where 16 took 77 s and 64 62 s
REFERENCE_BATCH = 32
_FIELDS = ("top_ids", "top_logprobs", "rest_logmass", "targets", "target_logprobs")


@dataclass(frozen=True)
class ReferenceAnswer:
    task: Task
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # ends with the end-of-generation token when the answer ended by itself
    text: str
    correct: bool | None  # None: nothing to check
    positions: ReferencePositions  # the reference's distribution before each answer token


@dataclass(frozen=True)
class ReferenceAnswers:
    answers: tuple[ReferenceAnswer, ...]
    skipped: tuple[str, ...]  # "<id>: why" for prompts that could not be asked


@dataclass(frozen=True)
class AnswerScore:
    """One prompt, one variant."""

    kld_sum: float
    same_top1: int  # answer tokens whose most likely token is the reference's
    tokens: int
    first_divergence: int | None  # None: the variant's greedy answer is the reference's, token for token
    text: str | None  # the variant's greedy answer (None: it differs, and there is nothing to check)
    correct: bool | None
    identical: bool  # the same text as the reference's answer (other tokens may spell the same text)


def prompt_ids_for(runtime, task: Task) -> list[int]:
    if task.messages is not None:
        return runtime.chat_prompt_ids(list(task.messages))
    return runtime.tokenize(task.prompt)


def answer_text(runtime, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> str:
    """The text of `answer_ids` as generation streams it after `prompt_ids` (an end-of-generation token adds none)."""
    decoder = IncrementalDecoder(runtime.detokenize, prompt_ids)
    pieces = [decoder.add(token) for token in answer_ids if token not in runtime.eos_token_ids]
    return "".join(pieces) + decoder.flush()


def answer_logits(runtime, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> np.ndarray:
    """Teacher forcing: the logits before each answer token, [len(answer_ids), vocab]."""
    sequence = list(prompt_ids) + list(answer_ids)
    return runtime.logits_from(sequence[:-1], len(prompt_ids) - 1)


def cache_path(model_fingerprint: str, tasks: Sequence[Task], context: int, top_k: int) -> Path:
    key = json.dumps([CACHE_FORMAT, model_fingerprint, tasks_digest(tasks), context, top_k])
    return cache_root() / "behaviour" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def reference_answers(runtime, model_fingerprint: str, tasks: Sequence[Task], context: int, top_k: int,
                      on_prompt: Callable[[], None] | None = None) -> ReferenceAnswers:
    """The reference's greedy answers to `tasks` that fit `context` tokens, from the cache or computed and cached.
    `runtime` is the TorchRuntime: it answers in batches of prompts.

    A built-in prompt the model's chat template refuses is left out (and said so); a user's task that it refuses
    is an error."""
    path = cache_path(model_fingerprint, tasks, context, top_k)
    if path.is_file():
        return _load(path, tasks)
    asked, skipped = [], []
    for index, task in enumerate(tasks):
        try:
            prompt_ids = prompt_ids_for(runtime, task)
        except EdgepackError as exc:
            if not task.builtin:
                raise EdgepackError(f"task {task.id} (line {task.line}): {exc}") from exc
            skipped.append(f"{task.id}: {exc}")
            continue
        if len(prompt_ids) + task.max_tokens > context:
            skipped.append(f"{task.id}: {len(prompt_ids)} prompt tokens + {task.max_tokens} to answer do not fit "
                           f"the {context}-token context")
            continue
        asked.append((index, prompt_ids))
    made: dict[int, ReferenceAnswer] = {}
    for max_tokens in sorted({tasks[i].max_tokens for i, _ in asked}):  # one batch size of answer per group
        group = [(i, prompt) for i, prompt in asked if tasks[i].max_tokens == max_tokens]

        def keep(row: int, ids: list[int], logits: np.ndarray, group=group) -> None:
            # the distributions come from generation itself: no second pass over prompt and answer
            index, prompt_ids = group[row]
            task, text = tasks[index], answer_text(runtime, prompt_ids, ids)
            made[index] = ReferenceAnswer(task=task, prompt_ids=tuple(prompt_ids), answer_ids=tuple(ids), text=text,
                                          correct=is_correct(text, task),
                                          positions=reference_positions(logits, np.asarray(ids), top_k))
            if on_prompt is not None:
                on_prompt()

        runtime.greedy_batch([prompt for _, prompt in group], max_tokens, batch_size=REFERENCE_BATCH, on_logits=keep)
    answers = [(index, made[index]) for index, _ in asked]
    _store(path, answers, skipped)
    return ReferenceAnswers(tuple(a for _, a in answers), tuple(skipped))


def _store(path: Path, answers: list[tuple[int, ReferenceAnswer]], skipped: list[str]) -> None:
    meta = {"skipped": skipped, "answers": [{"index": i, "text": a.text} for i, a in answers]}
    arrays = {"meta": np.asarray(json.dumps(meta))}
    for n, (_, answer) in enumerate(answers):
        arrays[f"prompt{n}"] = np.asarray(answer.prompt_ids, dtype=np.int32)
        arrays[f"answer{n}"] = np.asarray(answer.answer_ids, dtype=np.int32)
        for name in _FIELDS:
            arrays[f"{name}{n}"] = getattr(answer.positions, name)
    with atomic_output_file(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)  # not compressed: written faster than compressed, read as fast


def _load(path: Path, tasks: Sequence[Task]) -> ReferenceAnswers:
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        answers = []
        for n, entry in enumerate(meta["answers"]):
            task = tasks[entry["index"]]
            answers.append(ReferenceAnswer(
                task=task, prompt_ids=tuple(int(t) for t in data[f"prompt{n}"]),
                answer_ids=tuple(int(t) for t in data[f"answer{n}"]), text=entry["text"],
                correct=is_correct(entry["text"], task),
                positions=ReferencePositions(*(data[f"{name}{n}"] for name in _FIELDS))))
    return ReferenceAnswers(tuple(answers), tuple(meta["skipped"]))


def score_answers(runtime, answers: Sequence[ReferenceAnswer],
                  progress: Callable[[str, int], AbstractContextManager[Callable[[int], None]]] | None = None
                  ) -> list[AnswerScore]:
    """Each reference answer teacher-forced through `runtime`; then the diverging prompts answered by it anew, as
    many at once as the engine batches. `progress(label, total)`: a bar for each of the two steps (core.progress's
    progress_bar, with the variant's name and whether to show it bound)."""
    bar = progress or (lambda _label, _total: progress_bar("", 0, enabled=False))
    forced = []
    with bar("answers", len(answers)) as advance:
        for answer in answers:
            logits = answer_logits(runtime, answer.prompt_ids, answer.answer_ids)
            forced.append((score_positions(answer.positions, logits),
                           first_divergence(logits.argmax(axis=1), answer.answer_ids, runtime.eos_token_ids)))
            advance(1)
    # generated from the prompt, as a user would get it (prefilling the agreed part of the answer in one batch
    # instead of token by token can flip a near-tie); a prompt with nothing to check only needs to be known to differ
    regenerate = [n for n, (answer, (_, first)) in enumerate(zip(answers, forced, strict=True))
                  if first is not None and answer.task.checkable]
    with bar("answers that diverge, generated anew", len(regenerate)) as advance:
        generated = runtime.complete_all([list(answers[n].prompt_ids) for n in regenerate],
                                         [GenerationOptions(max_tokens=answers[n].task.max_tokens)
                                          for n in regenerate], on_done=lambda: advance(1))
    texts = {n: result.text for n, result in zip(regenerate, generated, strict=True)}
    scores = []
    for n, (answer, (positions, first)) in enumerate(zip(answers, forced, strict=True)):
        if first is None:
            text, correct = answer.text, answer.correct
        elif n in texts:
            text, correct = texts[n], is_correct(texts[n], answer.task)
        else:
            text, correct = None, None
        scores.append(AnswerScore(kld_sum=float(positions.kld.sum()), same_top1=int(positions.same_top1.sum()),
                                  tokens=len(answer.answer_ids), first_divergence=first, text=text, correct=correct,
                                  identical=first is None or text == answer.text))
    return scores


def first_divergence(most_likely: np.ndarray, answer_ids: Sequence[int], eos_ids: frozenset[int]) -> int | None:
    """The first answer token the variant would not pick greedily (any end-of-generation token ends it alike)."""
    for position, (picked, expected) in enumerate(zip(most_likely.tolist(), answer_ids, strict=True)):
        if picked != expected and not (picked in eos_ids and expected in eos_ids):
            return position
    return None


def mcnemar_p(only_reference_correct: int, only_variant_correct: int) -> float:
    """One-sided exact McNemar test: the chance of the variant losing at least this many of the discordant pairs
    if both were equally good (each discordant pair a fair coin)."""
    n = only_reference_correct + only_variant_correct
    return sum(math.comb(n, k) for k in range(only_reference_correct, n + 1)) / 2 ** n if n else 1.0


def summarise_behaviour(answers: Sequence[ReferenceAnswer], scores: Sequence[AnswerScore],
                        seed: int = 0) -> BehaviourQuality:
    kld = np.asarray([s.kld_sum for s in scores], dtype=np.float64)
    tokens = np.asarray([s.tokens for s in scores], dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(scores), size=(BOOTSTRAP_RESAMPLES, len(scores)))
    resampled = kld[picks].sum(axis=1) / tokens[picks].sum(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    checked = [(a.correct, s.correct) for a, s in zip(answers, scores, strict=True) if a.correct is not None]
    only_reference = sum(1 for ref, var in checked if ref and not var)
    only_variant = sum(1 for ref, var in checked if var and not ref)
    divergences = [s.first_divergence for s in scores if s.first_divergence is not None]
    return BehaviourQuality(
        prompts=len(scores), identical=sum(1 for s in scores if s.identical), answer_tokens=int(tokens.sum()),
        answer_kld_mean=float(kld.sum() / tokens.sum()), answer_kld_ci=(float(low), float(high)),
        answer_same_top1=float(sum(s.same_top1 for s in scores) / tokens.sum()),
        median_first_divergence=float(np.median(divergences)) if divergences else None,
        checkable=len(checked), correct=sum(1 for _, var in checked if var),
        reference_correct=sum(1 for ref, _ in checked if ref), only_reference_correct=only_reference,
        only_variant_correct=only_variant, mcnemar_p=mcnemar_p(only_reference, only_variant),
        differences=differences_to_show(answers, scores))


def differences_to_show(answers: Sequence[ReferenceAnswer], scores: Sequence[AnswerScore],
                        limit: int = DIFFERENCES_SHOWN) -> tuple[AnswerDifference, ...]:
    """A few prompts whose answers differ: first where the variant lost a right answer, then any other."""
    differing = [(a, s) for a, s in zip(answers, scores, strict=True) if not s.identical and s.text is not None]
    differing.sort(key=lambda pair: 0 if pair[0].correct and pair[1].correct is False else 1)
    return tuple(AnswerDifference(id=a.task.id, prompt=a.task.question, reference=a.text.strip(),
                                  variant=s.text.strip(), first_divergence=int(s.first_divergence))
                 for a, s in differing[:limit])


def task_accuracy(answers: Sequence[ReferenceAnswer], correct: Sequence[bool | None]) -> float | None:
    """The share of the user's own tasks (not the built-in prompts) answered right."""
    mine = [c for a, c in zip(answers, correct, strict=True) if not a.task.builtin and c is not None]
    return sum(mine) / len(mine) if mine else None
