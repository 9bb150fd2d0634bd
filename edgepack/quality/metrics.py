"""Quality metrics of a variant's next-token distributions against the reference's.

The reference is stored compactly per position: its top-k log-probabilities (ids and values), the log of the
probability mass outside them, and its log-probability of the token that actually comes next. The variant side
is always the full distribution from its logits. KL divergence treats the reference's mass outside its top k as
one bucket, which gives a lower bound of the exact value that is tight when k covers nearly all the mass
(edgepack keeps k = 1024: on the demo student's built-in text the reference leaves 14% of its mass outside its top 32,
and mean KL divergence of Q4_K_M read 0.025 with k = 32, 0.030 with 256, 0.032 with 2048, against 0.0326 from
llama.cpp's llama-perplexity, which keeps the whole distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReferencePositions:
    """The reference's view of a run of positions (one window or many)."""

    top_ids: np.ndarray  # [P, K] int32, most likely first
    top_logprobs: np.ndarray  # [P, K] float32
    rest_logmass: np.ndarray  # [P] float32, log(1 - sum(exp(top_logprobs))); -inf when nothing is left
    targets: np.ndarray  # [P] int32, the token that actually follows
    target_logprobs: np.ndarray  # [P] float32


@dataclass(frozen=True)
class PositionScores:
    """Per-position values for one variant, concatenated over windows before summarising."""

    kld: np.ndarray
    same_top1: np.ndarray
    target_logprobs: np.ndarray
    target_delta_p: np.ndarray


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference_positions(logits: np.ndarray, targets: np.ndarray, top_k: int) -> ReferencePositions:
    """Compress the reference's full logits [P, V] for positions whose next tokens are `targets`."""
    logprobs = log_softmax_rows(logits)
    k = min(top_k, logprobs.shape[1])
    candidates = np.argpartition(-logprobs, k - 1, axis=1)[:, :k]  # the k largest, unordered
    order = np.argsort(-np.take_along_axis(logprobs, candidates, axis=1), axis=1, kind="stable")
    top_ids = np.take_along_axis(candidates, order, axis=1)
    top = np.take_along_axis(logprobs, top_ids, axis=1)
    rest = 1.0 - np.exp(top).sum(axis=1)
    with np.errstate(divide="ignore"):
        rest_log = np.where(rest > 1e-12, np.log(np.clip(rest, 1e-300, None)), -np.inf)
    return ReferencePositions(top_ids=top_ids.astype(np.int32), top_logprobs=top.astype(np.float32),
                              rest_logmass=rest_log.astype(np.float32), targets=targets.astype(np.int32),
                              target_logprobs=logprobs[np.arange(len(targets)), targets].astype(np.float32))


def score_positions(reference: ReferencePositions, variant_logits: np.ndarray) -> PositionScores:
    """KL(reference || variant), same top-1, and the variant's log-probability of the actual next token."""
    logq = log_softmax_rows(variant_logits)
    rows = np.arange(len(reference.targets))
    p_log = reference.top_logprobs.astype(np.float64)
    q_top_log = np.take_along_axis(logq, reference.top_ids.astype(np.int64), axis=1)
    kld = (np.exp(p_log) * (p_log - q_top_log)).sum(axis=1)
    rest_p = np.exp(reference.rest_logmass.astype(np.float64))
    q_rest = np.clip(1.0 - np.exp(q_top_log).sum(axis=1), 1e-300, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest_term = np.where(rest_p > 0, rest_p * (reference.rest_logmass - np.log(q_rest)), 0.0)
    kld = np.maximum(kld + rest_term, 0.0)  # rounding can leave -1e-12 where the two are equal
    target_logq = logq[rows, reference.targets]
    return PositionScores(
        kld=kld,
        same_top1=logq.argmax(axis=1) == reference.top_ids[:, 0],
        target_logprobs=target_logq,
        target_delta_p=np.exp(reference.target_logprobs.astype(np.float64)) - np.exp(target_logq),
    )


@dataclass(frozen=True)
class Summary:
    perplexity: float
    kld_mean: float
    kld_p99: float
    same_top1: float
    rms_delta_p: float


def perplexity(target_logprobs: np.ndarray) -> float:
    return float(np.exp(-np.mean(target_logprobs)))


def summarise(scores: list[PositionScores]) -> Summary:
    kld = np.concatenate([s.kld for s in scores])
    return Summary(
        perplexity=perplexity(np.concatenate([s.target_logprobs for s in scores])),
        kld_mean=float(kld.mean()),
        kld_p99=float(np.percentile(kld, 99)),
        same_top1=float(np.concatenate([s.same_top1 for s in scores]).mean()),
        rms_delta_p=float(np.sqrt(np.mean(np.concatenate([s.target_delta_p for s in scores]) ** 2))),
    )


BOOTSTRAP_BLOCK = 64  # positions per resampled block: neighbouring positions are not independent
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Intervals:
    """95% confidence intervals, (low, high)."""

    ppl_ratio: tuple[float, float]
    kld_mean: tuple[float, float]


def bootstrap_intervals(reference_target_logprobs: np.ndarray, scores: list[PositionScores],
                        block: int = BOOTSTRAP_BLOCK, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0) -> Intervals:
    """A block bootstrap over the scored positions (in text order, cut into blocks of `block`): the 2.5th and 97.5th
    percentiles of the perplexity ratio and the mean KL divergence over `resamples` resamplings of the blocks."""
    variant = np.concatenate([s.target_logprobs for s in scores]).astype(np.float64)
    kld = np.concatenate([s.kld for s in scores]).astype(np.float64)
    reference = np.asarray(reference_target_logprobs, dtype=np.float64)
    starts = np.arange(0, len(kld), block)
    # per block: sum of (reference - variant) log-probabilities of the next token, sum of KLD, and its length
    log_ratio = np.add.reduceat(reference - variant, starts)
    kld_sum = np.add.reduceat(kld, starts)
    counts = np.add.reduceat(np.ones_like(kld), starts)
    picks = np.random.default_rng(seed).integers(0, len(starts), size=(resamples, len(starts)))
    n = counts[picks].sum(axis=1)
    ratios = np.exp(log_ratio[picks].sum(axis=1) / n)
    means = kld_sum[picks].sum(axis=1) / n
    return Intervals(ppl_ratio=_percentiles(ratios), kld_mean=_percentiles(means))


# A variant stops reading the evaluation text once both intervals are this tight (and it has read MIN_WINDOWS):
# the mean KL divergence to within 10% of itself, the perplexity ratio to within half a percentage point. The rule
# does not look at the gate, so a stored result serves any gate.
KLD_RELATIVE_HALF_WIDTH = 0.10
PPL_RATIO_HALF_WIDTH = 0.005


def precise_enough(intervals: Intervals, kld_mean: float) -> bool:
    kld_half = (intervals.kld_mean[1] - intervals.kld_mean[0]) / 2
    ppl_half = (intervals.ppl_ratio[1] - intervals.ppl_ratio[0]) / 2
    return kld_half <= KLD_RELATIVE_HALF_WIDTH * kld_mean and ppl_half <= PPL_RATIO_HALF_WIDTH


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)
