"""Distillation losses on the teacher's sparse targets: its top-k log-probabilities per position plus one bucket
for the mass outside them (what the teacher cache stores).

Both distributions are first reduced to the same K + 1 classes (the teacher's top k tokens, and "every other
token"), then softened by the temperature T (log-probabilities divided by T and renormalised over the K + 1
classes). At T = 1 the forward KL is the bucketed KL divergence the quality stage reports (edgepack.quality.metrics),
a lower bound of the full-vocabulary KL that is tight when k covers most of the mass. The distillation term is
multiplied by T², which keeps its gradient on the same scale whatever T (Hinton et al., 2015).

Losses, with P the teacher and Q the student:
- forward-kl: KL(P || Q), mass-covering (the default);
- reverse-kl: KL(Q || P), mode-seeking;
- jsd (generalised Jensen-Shannon with β, as in on-policy distillation, GKD): with M = β·P + (1 - β)·Q,
  β·KL(P || M) + (1 - β)·KL(Q || M); β = 0 is taken as forward KL and β = 1 as reverse KL (the formula itself
  tends to 0 at both ends).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("forward-kl", "reverse-kl", "jsd")


@dataclass(frozen=True)
class LossSettings:
    kind: str = "forward-kl"
    temperature: float = 2.0
    jsd_beta: float = 0.5
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha goes to cross-entropy on the data

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"unknown loss {self.kind!r}; accepted: {', '.join(LOSSES)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be above 0, got {self.temperature}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd beta must be between 0 and 1, got {self.jsd_beta}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha}")


def student_classes(student_logits: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """The student's log-probabilities over the teacher's K + 1 classes: [N, V] logits, [N, K] ids -> [N, K + 1]."""
    return classes_from_logprobs(torch.log_softmax(student_logits.float(), dim=-1), top_ids)


def classes_from_logprobs(student_logprobs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """As student_classes, from log-probabilities already computed (one log-softmax serves this and the
    cross-entropy). The bucket's mass is 1 - the top k's, floored at 1e-7 (float32 cannot resolve less)."""
    top = student_logprobs.gather(-1, top_ids)
    rest = torch.log((1.0 - top.exp().sum(-1, keepdim=True)).clamp(min=1e-7))
    return torch.cat([top, rest], dim=-1)


def teacher_classes(top_logprobs: torch.Tensor, rest_logmass: torch.Tensor) -> torch.Tensor:
    """The teacher's stored log-probabilities as K + 1 classes: [N, K] and [N] -> [N, K + 1]."""
    return torch.cat([top_logprobs.float(), rest_logmass.float().unsqueeze(-1)], dim=-1)


def soften(class_logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(class_logprobs / temperature, dim=-1)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row; a class P gives no mass adds nothing, whatever Q says of it."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def divergence(teacher_log: torch.Tensor, student_log: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """Per-row divergence between softened class distributions (no T² here)."""
    if settings.kind == "forward-kl" or (settings.kind == "jsd" and settings.jsd_beta == 0.0):
        return kl(teacher_log, student_log)
    if settings.kind == "reverse-kl" or (settings.kind == "jsd" and settings.jsd_beta == 1.0):
        return kl(student_log, teacher_log)
    beta = settings.jsd_beta
    mixture = torch.logsumexp(torch.stack([teacher_log + math.log(beta), student_log + math.log(1 - beta)]), dim=0)
    return beta * kl(teacher_log, mixture) + (1 - beta) * kl(student_log, mixture)


def distillation_loss(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                      rest_logmass: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """Mean over rows of T² · divergence(teacher, student) at temperature T; rows are scored positions."""
    return _distillation(torch.log_softmax(student_logits.float(), dim=-1), top_ids, top_logprobs, rest_logmass,
                         settings)


def _distillation(student_logprobs: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                  rest_logmass: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    teacher = soften(teacher_classes(top_logprobs, rest_logmass), settings.temperature)
    student = soften(classes_from_logprobs(student_logprobs, top_ids), settings.temperature)
    return settings.temperature ** 2 * divergence(teacher, student, settings).mean()


def combined_loss(student_logits: torch.Tensor, targets: torch.Tensor, top_ids: torch.Tensor | None,
                  top_logprobs: torch.Tensor | None, rest_logmass: torch.Tensor | None,
                  settings: LossSettings) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha · distillation + (1 - alpha) · cross-entropy on the data's next tokens ([N, V] logits, [N] targets);
    with no teacher targets (sequence-level distillation without logprobs, or cross-entropy-only training) the
    cross-entropy alone. Returns the loss and its parts."""
    logprobs = torch.log_softmax(student_logits.float(), dim=-1)
    ce = F.nll_loss(logprobs, targets)
    if top_ids is None or settings.alpha == 0.0:
        return ce, {"ce": float(ce.detach())}
    kd = _distillation(logprobs, top_ids, top_logprobs, rest_logmass, settings)
    loss = settings.alpha * kd + (1 - settings.alpha) * ce
    return loss, {"kd": float(kd.detach()), "ce": float(ce.detach())}
