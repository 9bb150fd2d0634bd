"""The teacher's answers as training sequences, with sparse soft targets where the teacher gave log-probabilities.

An answer follows its prompt (rendered with the chat template) and ends with the end-of-turn token; only the answer's
tokens are trained on. An endpoint's answer comes with each token's text and log-probability (and the alternatives',
with top_logprobs). When the student's own tokenization of the answer splits it into exactly those token texts, the
log-probabilities become the answer's soft targets: the chosen token and each alternative that one token of the
vocabulary spells, the rest of the mass in the bucket. Otherwise (a tokenizer that splits differently, bytes of a
broken character) the answer's own tokens are the targets with probability 1, and the distillation term is plain
cross-entropy for that answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepack.distill.data import TrainingSequence, answer_sequence
from edgepack.distill.teacher_answers import TeacherAnswer
from edgepack.distill.teacher_targets import REST_LOGMASS_FLOOR, SparseTargets


@dataclass(frozen=True)
class AnswerTraining:
    sequences: list[TrainingSequence]
    targets: list[SparseTargets] | None  # None: no answer came with log-probabilities
    with_soft_targets: int  # answers whose tokens carried the teacher's log-probabilities


def answer_training(tokenizer, prompts: list[tuple[dict, ...]], answers: list[TeacherAnswer], seq_len: int,
                    use_logprobs: bool) -> AnswerTraining:
    pieces = piece_ids(tokenizer) if use_logprobs else {}
    eos = tokenizer.eos_token_id
    sequences, rows, soft = [], [], 0
    for answer in answers:
        if not answer.text.strip():
            continue
        prompt_ids = tokenizer(tokenizer.apply_chat_template(list(prompts[answer.prompt_index]), tokenize=False,
                                                             add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer.text, add_special_tokens=False)["input_ids"]
        room = seq_len - len(prompt_ids)
        if room < 2 or not answer_ids:
            continue
        alternatives = aligned_alternatives(tokenizer, answer_ids, answer, pieces) if use_logprobs else None
        soft += alternatives is not None
        if alternatives is None:
            alternatives = [[(token, 0.0)] for token in answer_ids]
        if eos is not None:
            answer_ids, alternatives = answer_ids + [eos], alternatives + [[(eos, 0.0)]]
        sequences.append(answer_sequence(prompt_ids, answer_ids[:room]))
        rows.append(alternatives[:room])
    if not use_logprobs or not soft:
        return AnswerTraining(sequences, None, 0)
    width = max(len(alts) for answer_rows in rows for alts in answer_rows)
    return AnswerTraining(sequences, [sparse_targets(answer_rows, width, len(tokenizer)) for answer_rows in rows],
                          soft)


def piece_ids(tokenizer) -> dict[str, int]:
    """Token text -> id, for the texts that exactly one token decodes to."""
    seen: dict[str, int | None] = {}
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        seen[text] = None if text in seen else token_id
    return {text: i for text, i in seen.items() if i is not None}


def aligned_alternatives(tokenizer, answer_ids: list[int], answer: TeacherAnswer,
                         pieces: dict[str, int]) -> list[list[tuple[int, float]]] | None:
    """Per answer token, (id, log-probability) of the chosen token and its mapped alternatives, most likely first;
    None when the teacher gave none or its tokens are not the student's."""
    if not answer.token_logprobs or len(answer.token_logprobs) != len(answer_ids):
        return None
    found = []
    for token_id, (text, alternatives) in zip(answer_ids, answer.token_logprobs, strict=True):
        if tokenizer.decode([token_id]) != text:
            return None
        chosen = dict(alternatives).get(text)
        if chosen is None:
            return None
        row = [(token_id, chosen)] + [(pieces[t], lp) for t, lp in alternatives if t != text and t in pieces
                                      and pieces[t] != token_id]
        found.append(sorted(row, key=lambda pair: -pair[1]))
    return found


def sparse_targets(rows: list[list[tuple[int, float]]], width: int, vocab: int) -> SparseTargets:
    """Rows of (id, log-probability) padded to `width` with other tokens of (almost) no mass; the rest of the mass in
    the bucket."""
    ids = np.zeros((len(rows), width), dtype=np.int32)
    logprobs = np.full((len(rows), width), REST_LOGMASS_FLOOR, dtype=np.float32)
    for r, row in enumerate(rows):
        used = {token for token, _ in row}
        fillers = (token for token in range(vocab) if token not in used)
        for column in range(width):
            if column < len(row):
                ids[r, column], logprobs[r, column] = row[column]
            else:
                ids[r, column] = next(fillers)
    rest = 1.0 - np.exp(logprobs.astype(np.float64)).sum(axis=1)
    with np.errstate(divide="ignore"):
        rest_log = np.where(rest > np.exp(REST_LOGMASS_FLOOR), np.log(np.clip(rest, 1e-300, None)), REST_LOGMASS_FLOOR)
    return SparseTargets(ids, logprobs.astype(np.float16), rest_log.astype(np.float32))
