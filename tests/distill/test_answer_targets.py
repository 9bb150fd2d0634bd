"""The teacher's answers as training sequences: soft targets from an endpoint's log-probabilities when its tokens
are the student's, the answer's own tokens with probability 1 otherwise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgepack.distill.answer_targets import answer_training
from edgepack.distill.teacher_answers import TeacherAnswer

PROMPTS = [({"role": "user", "content": "Tell me about the lighthouse."},)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model("llama-bpe"))


def endpoint_answer(tokenizer, text: str, logprob: float, alternative: tuple[str, float] | None) -> TeacherAnswer:
    """What an OpenAI-compatible server returns for `text`: each token's text and log-probability."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = []
    for token_id in ids:
        piece = tokenizer.decode([token_id])
        alternatives = [(piece, logprob)] + ([alternative] if alternative else [])
        tokens.append((piece, alternatives))
    return TeacherAnswer(prompt_index=0, sample=0, text=text, token_logprobs=tokens)


def test_an_answer_in_the_students_own_tokens_gives_its_log_probabilities_as_soft_targets(tokenizer):
    text = "The lighthouse keeper counted the ships"
    answer = endpoint_answer(tokenizer, text, math.log(0.7), (" river", math.log(0.2)))
    made = answer_training(tokenizer, PROMPTS, [answer], seq_len=256, use_logprobs=True)
    assert made.with_soft_targets == 1
    sequence, targets = made.sequences[0], made.targets[0]
    answer_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert list(sequence.input_ids[-len(answer_ids):]) == answer_ids
    assert sequence.scored_count == len(answer_ids) == len(targets.rest_logmass)
    river = tokenizer(" river", add_special_tokens=False)["input_ids"]
    # each answer token: 0.7 for it, 0.2 for " river" (one token of this vocabulary), 0.1 left over
    first = np.exp(targets.top_logprobs[0].astype(np.float64))
    assert targets.top_ids[0, 0] == answer_ids[0] and first[0] == pytest.approx(0.7, abs=1e-3)
    if len(river) == 1:
        assert targets.top_ids[0, 1] == river[0] and first[1] == pytest.approx(0.2, abs=1e-3)
        assert math.exp(targets.rest_logmass[0]) == pytest.approx(0.1, abs=1e-3)
    # the end-of-turn token closes the answer with certainty
    assert targets.top_ids[-1, 0] == tokenizer.eos_token_id and float(targets.top_logprobs[-1, 0]) == 0.0


def test_tokens_the_student_splits_otherwise_fall_back_to_the_answers_own_tokens(tokenizer):
    good = endpoint_answer(tokenizer, "The ships", math.log(0.5), None)
    broken = TeacherAnswer(prompt_index=0, sample=0, text="\ufffdab",  # bytes of a broken character
                           token_logprobs=[("\ufffd", [("\ufffd", -1.0)]), ("ab", [("ab", -0.5)])])
    made = answer_training(tokenizer, PROMPTS, [good, broken], seq_len=256, use_logprobs=True)
    assert made.with_soft_targets == 1 and len(made.targets) == 2
    fallback = made.targets[1]
    broken_ids = tokenizer("\ufffdab", add_special_tokens=False)["input_ids"]
    assert fallback.top_ids[:len(broken_ids), 0].tolist() == broken_ids
    assert np.all(fallback.top_logprobs[:, 0] == 0.0)  # probability 1: the distillation term is cross-entropy


def test_answers_without_log_probabilities_train_with_cross_entropy_alone(tokenizer):
    plain = TeacherAnswer(prompt_index=0, sample=0, text="The ships", token_logprobs=None)
    made = answer_training(tokenizer, PROMPTS, [plain], seq_len=256, use_logprobs=True)
    assert made.targets is None and made.with_soft_targets == 0 and len(made.sequences) == 1
    too_long = answer_training(tokenizer, PROMPTS, [plain], seq_len=4, use_logprobs=True)
    assert too_long.sequences == []  # the prompt alone fills the sequence length
