"""The distillation losses against values worked out by hand (math on the numbers, not the code under test)."""

from __future__ import annotations

import math

import pytest
import torch

from edgepack.distill.losses import LossSettings, combined_loss, distillation_loss, student_classes
from edgepack.distill.teacher_targets import sparse_from_logits

# the teacher gave its top 2 tokens (ids 0 and 1) 0.6 and 0.3, and 0.1 to the other tokens together;
# the student's four tokens have probabilities 0.5, 0.25, 0.125, 0.125: over the same classes 0.5, 0.25, 0.25
TEACHER = [0.6, 0.3, 0.1]
STUDENT = [0.5, 0.25, 0.25]
STUDENT_LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]])) + 3.0  # any shift: logits, not log-probs
TOP_IDS = torch.tensor([[0, 1]])
TOP_LOGPROBS = torch.log(torch.tensor([[0.6, 0.3]]))
REST = torch.log(torch.tensor([0.1]))


def hand_kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def soften(p: list[float], temperature: float) -> list[float]:
    powered = [x ** (1 / temperature) for x in p]
    return [x / sum(powered) for x in powered]


def loss(kind: str, temperature: float = 1.0, beta: float = 0.5) -> float:
    settings = LossSettings(kind=kind, temperature=temperature, jsd_beta=beta, alpha=1.0)
    return float(distillation_loss(STUDENT_LOGITS, TOP_IDS, TOP_LOGPROBS, REST, settings))


def test_the_student_is_reduced_to_the_teachers_top_k_and_one_bucket_for_the_rest():
    classes = student_classes(STUDENT_LOGITS, TOP_IDS).exp()[0].tolist()
    assert classes == pytest.approx(STUDENT, abs=1e-6)


def test_forward_kl_at_temperature_1_is_the_plain_kl_of_the_classes():
    # 0.6 ln(0.6/0.5) + 0.3 ln(0.3/0.25) + 0.1 ln(0.1/0.25) = 0.10939 + 0.05470 - 0.09163
    assert loss("forward-kl") == pytest.approx(0.0724563, abs=1e-5)
    assert loss("forward-kl") == pytest.approx(hand_kl(TEACHER, STUDENT), abs=1e-6)


def test_temperature_softens_both_sides_and_the_loss_is_scaled_by_t_squared():
    expected = 4 * hand_kl(soften(TEACHER, 2.0), soften(STUDENT, 2.0))
    assert loss("forward-kl", temperature=2.0) == pytest.approx(expected, abs=1e-6)
    assert expected != pytest.approx(hand_kl(TEACHER, STUDENT), abs=1e-3)  # softening changes the value


def test_reverse_kl_swaps_the_arguments():
    assert loss("reverse-kl") == pytest.approx(hand_kl(STUDENT, TEACHER), abs=1e-6)


def test_jsd_at_beta_0_and_1_is_the_forward_and_reverse_kl_and_in_between_the_mixture_formula():
    assert loss("jsd", beta=0.0) == pytest.approx(hand_kl(TEACHER, STUDENT), abs=1e-6)
    assert loss("jsd", beta=1.0) == pytest.approx(hand_kl(STUDENT, TEACHER), abs=1e-6)
    beta = 0.3
    mixture = [beta * p + (1 - beta) * q for p, q in zip(TEACHER, STUDENT, strict=True)]
    expected = beta * hand_kl(TEACHER, mixture) + (1 - beta) * hand_kl(STUDENT, mixture)
    assert loss("jsd", beta=beta) == pytest.approx(expected, abs=1e-6)


def test_identical_distributions_give_zero_for_every_loss():
    teacher_logprobs = torch.log(torch.tensor([[0.5, 0.25]]))
    rest = torch.log(torch.tensor([0.25]))
    for kind in ("forward-kl", "reverse-kl", "jsd"):
        value = distillation_loss(STUDENT_LOGITS, TOP_IDS, teacher_logprobs, rest,
                                  LossSettings(kind=kind, temperature=2.0))
        assert float(value) == pytest.approx(0.0, abs=1e-6)


def test_alpha_mixes_the_distillation_term_with_cross_entropy_on_the_data():
    target = torch.tensor([1])  # the data's next token: the student gives it 0.25
    kd = hand_kl(TEACHER, STUDENT)
    for alpha in (0.0, 0.5, 1.0):
        value, parts = combined_loss(STUDENT_LOGITS, target, TOP_IDS, TOP_LOGPROBS, REST,
                                     LossSettings(temperature=1.0, alpha=alpha))
        assert float(value) == pytest.approx(alpha * kd + (1 - alpha) * -math.log(0.25), abs=1e-5)
    assert parts["ce"] == pytest.approx(-math.log(0.25), abs=1e-5)


def test_the_teachers_sparse_targets_keep_its_top_k_and_the_mass_left_over():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    ids, logprobs, rest = sparse_from_logits(logits, top_k=2)
    assert ids.tolist() == [[1, 3]]
    assert logprobs.exp().tolist()[0] == pytest.approx([0.4, 0.3], abs=1e-6)
    assert float(rest.exp()) == pytest.approx(0.3, abs=1e-6)


def test_bad_settings_are_refused_with_what_is_accepted():
    with pytest.raises(ValueError, match="accepted: forward-kl, reverse-kl, jsd"):
        LossSettings(kind="l2")
    with pytest.raises(ValueError, match="temperature"):
        LossSettings(temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        LossSettings(alpha=1.5)
