"""Quality metrics against values computed by hand on small distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgepack.core.artifacts import VariantQuality
from edgepack.core.errors import EdgepackError
from edgepack.quality.gate import Gate, parse_fraction
from edgepack.quality.metrics import (
    Intervals,
    perplexity,
    precise_enough,
    reference_positions,
    score_positions,
    summarise,
)

P = np.array([0.7, 0.2, 0.1])
Q = np.array([0.5, 0.3, 0.2])


def logits_of(probs: np.ndarray) -> np.ndarray:
    return np.log(probs)[None, :] + 3.0  # any shift: logits are defined up to a constant


def test_kl_divergence_on_the_full_distribution():
    reference = reference_positions(logits_of(P), np.array([1]), top_k=3)
    scores = score_positions(reference, logits_of(Q))
    by_hand = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    assert by_hand == pytest.approx(0.0851228, abs=1e-6)
    assert scores.kld[0] == pytest.approx(by_hand, abs=1e-9)


def test_kl_divergence_with_top_k_and_the_remaining_mass():
    reference = reference_positions(logits_of(P), np.array([1]), top_k=1)
    assert math.exp(reference.rest_logmass[0]) == pytest.approx(0.3, abs=1e-6)
    scores = score_positions(reference, logits_of(Q))
    by_hand = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)  # {token 0} and the rest as one bucket
    assert scores.kld[0] == pytest.approx(by_hand, abs=1e-6)
    assert scores.kld[0] <= 0.0851228  # never above the exact value


def test_identical_distributions_score_zero():
    reference = reference_positions(logits_of(P), np.array([2]), top_k=2)
    scores = score_positions(reference, logits_of(P) + 11.0)
    assert scores.kld[0] == pytest.approx(0.0, abs=1e-12)
    assert scores.same_top1[0]
    assert scores.target_delta_p[0] == pytest.approx(0.0, abs=1e-7)  # stored as float32


def test_perplexity_top1_and_rms_delta_p():
    ref_logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]))
    var_logits = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.25, 0.65]]))
    targets = np.array([1, 1])
    scores = score_positions(reference_positions(ref_logits, targets, top_k=3), var_logits)
    summary = summarise([scores])
    assert summary.perplexity == pytest.approx(math.exp(-(math.log(0.3) + math.log(0.25)) / 2), rel=1e-9)
    assert summary.same_top1 == 0.5  # position 0 agrees (token 0), position 1 does not (1 vs 2)
    assert summary.rms_delta_p == pytest.approx(math.sqrt(((0.2 - 0.3) ** 2 + (0.6 - 0.25) ** 2) / 2), rel=1e-6)
    assert perplexity(np.log(np.array([0.5, 0.25]))) == pytest.approx(math.sqrt(8))


def test_p99_is_the_tail_not_the_mean():
    from edgepack.quality.metrics import PositionScores

    kld = np.array([0.0] * 98 + [5.0, 5.0])
    scores = PositionScores(kld=kld, same_top1=np.ones(100, bool), target_logprobs=np.zeros(100),
                            target_delta_p=np.zeros(100))
    summary = summarise([scores])
    assert summary.kld_mean == pytest.approx(0.1)
    assert summary.kld_p99 == pytest.approx(5.0)  # the 99th percentile of 100 values lies in the top two


def _gated(ppl_ratio_upper: float, kld_upper: float, task_accuracy: float | None) -> VariantQuality:
    return VariantQuality(name="v", path=None, engine="e", perplexity=1.0, ppl_ratio=1.0, kld_mean=0.0, kld_p99=0.0,
                          same_top1=1.0, rms_delta_p=0.0, task_accuracy=task_accuracy, passed=False, reasons=(),
                          seconds=0.0, ppl_ratio_ci=(1.0, ppl_ratio_upper), kld_mean_ci=(0.0, kld_upper))


def test_gate_reasons_and_fractions():
    gate = Gate(max_ppl_increase=parse_fraction("5%", "x"), max_kld=0.05, min_task_accuracy=parse_fraction("0.8", "y"))
    assert gate.reasons(_gated(1.049, 0.049, 0.8)) == ()
    reasons = gate.reasons(_gated(1.07, 0.06, 0.5))
    assert len(reasons) == 3
    assert "perplexity up to +7.00% (upper end of its 95% interval) > +5.00% allowed" in reasons[0]
    assert "up to 0.0600 (upper end of its 95% interval) > 0.0500" in reasons[1] and "50.0% < 80.0%" in reasons[2]
    assert Gate().reasons(_gated(1.01, 0.01, None)) == ()
    with pytest.raises(EdgepackError, match="not a number or a percentage"):
        parse_fraction("five", "--max-ppl-increase")


def test_bootstrap_intervals_match_the_normal_approximation_on_independent_positions():
    """On independent positions the block bootstrap's 95% interval of a mean is about mean ± 1.96·σ/√n (the
    central limit theorem); with no spread it collapses to the value itself."""
    from edgepack.quality.metrics import PositionScores, bootstrap_intervals

    rng = np.random.default_rng(3)
    n, sigma = 8192, 0.02
    kld = np.abs(rng.normal(0.05, sigma, n))
    reference = rng.normal(-2.0, 0.5, n)
    variant = reference - 0.01  # every position 0.01 nats less likely: PPL ratio exactly e^0.01
    scores = [PositionScores(kld=kld[i:i + 1000], same_top1=np.ones(len(kld[i:i + 1000]), bool),
                             target_logprobs=variant[i:i + 1000], target_delta_p=np.zeros(len(kld[i:i + 1000])))
              for i in range(0, n, 1000)]
    intervals = bootstrap_intervals(reference, scores)
    low, high = intervals.kld_mean
    half_width = 1.96 * kld.std() / math.sqrt(n)
    assert low < kld.mean() < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.25)
    assert intervals.ppl_ratio == pytest.approx((math.exp(0.01), math.exp(0.01)), rel=1e-9)


def test_a_variant_reads_on_until_both_intervals_are_tight():
    # half widths by hand: PPL ratio 0.004 (limit 0.005), KLD 0.0005 of a mean of 0.01 (limit 10% = 0.001)
    assert precise_enough(Intervals(ppl_ratio=(1.000, 1.008), kld_mean=(0.0095, 0.0105)), 0.01)
    assert not precise_enough(Intervals(ppl_ratio=(1.000, 1.012), kld_mean=(0.0095, 0.0105)), 0.01)
    assert not precise_enough(Intervals(ppl_ratio=(1.000, 1.008), kld_mean=(0.008, 0.012)), 0.01)
