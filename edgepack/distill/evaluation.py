"""How close the student is to the teacher, measured with the quality stage's own metrics.

Held-out text (edgepack's built-in evaluation text unless `--eval-text`; never training data) is cut into windows
as the quality stage cuts it; the teacher's reference positions come from the quality stage's cache (shared with
`edgepack eval` and `edgepack build`), and the student is scored on the same positions: mean KL divergence to the
teacher, the student's perplexity and its ratio to the teacher's, same top-1. When the teacher has a chat template,
the behaviour prompts' reference answers are teacher-forced through the student too (answer KL divergence and
same top-1 on the answer tokens; no generation, so it stays cheap enough to run before and after training).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgepack.quality.behaviour import ReferenceAnswer
from edgepack.quality.metrics import PositionScores, ReferencePositions, perplexity, score_positions, summarise
from edgepack.quality.reference import EvalWindows, first_scored


@dataclass(frozen=True)
class HeldOut:
    """What the student is compared on: the teacher's view of held-out windows (and of its own answers)."""

    windows: EvalWindows
    reference: tuple[ReferencePositions, ...]
    answers: tuple[ReferenceAnswer, ...] = ()

    @property
    def positions(self) -> int:
        return sum(len(r.targets) for r in self.reference)


@dataclass(frozen=True)
class StudentMetrics:
    kld_mean: float
    perplexity: float
    ppl_ratio: float  # student's perplexity / teacher's on the same positions
    same_top1: float
    answer_kld: float | None = None  # mean over the behaviour prompts' answer tokens
    answer_same_top1: float | None = None


@torch.inference_mode()
def student_logits(model, token_ids: tuple[int, ...], start: int, device) -> np.ndarray:
    """Logits from position `start` on, [len - start, V], as float32 numpy."""
    ids = torch.tensor([list(token_ids)], device=device)
    return model(input_ids=ids, use_cache=False).logits[0, start:].float().cpu().numpy()


def measure_student(model, held_out: HeldOut, device, with_answers: bool = True) -> StudentMetrics:
    was_training = model.training
    model.eval()
    try:
        scores: list[PositionScores] = []
        for tokens, reference in zip(held_out.windows.windows, held_out.reference, strict=True):
            logits = student_logits(model, tokens, first_scored(len(tokens)), device)[:-1]
            scores.append(score_positions(reference, logits))
        summary = summarise(scores)
        teacher_ppl = perplexity(np.concatenate([r.target_logprobs for r in held_out.reference]))
        answer_kld = answer_same = None
        if with_answers and held_out.answers:
            answer_kld, answer_same = _answer_scores(model, held_out.answers, device)
        return StudentMetrics(kld_mean=summary.kld_mean, perplexity=summary.perplexity,
                              ppl_ratio=summary.perplexity / teacher_ppl, same_top1=summary.same_top1,
                              answer_kld=answer_kld, answer_same_top1=answer_same)
    finally:
        model.train(was_training)


def _answer_scores(model, answers: tuple[ReferenceAnswer, ...], device) -> tuple[float, float]:
    kld_sum = same = tokens = 0.0
    for answer in answers:
        sequence = answer.prompt_ids + answer.answer_ids
        logits = student_logits(model, sequence[:-1], len(answer.prompt_ids) - 1, device)
        scored = score_positions(answer.positions, logits)
        kld_sum += float(scored.kld.sum())
        same += float(scored.same_top1.sum())
        tokens += len(answer.answer_ids)
    return kld_sum / tokens, same / tokens
