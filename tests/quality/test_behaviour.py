"""Behaviour checks: the built-in prompts, the answer checks, McNemar's test, the gate's rules, and the whole
check on real engines (the claim "no argmax divergence under teacher forcing -> the same greedy answer" is
checked against each engine's own greedy generation)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from edgepack.core.artifacts import BehaviourQuality, VariantQuality
from edgepack.core.errors import EdgepackError
from edgepack.quality.behaviour import first_divergence, mcnemar_p, prompt_ids_for
from edgepack.quality.evaluate import EvalOptions, evaluate
from edgepack.quality.gate import Gate
from edgepack.quality.tasks import Task, builtin_tasks, is_correct, load_tasks
from runtimes.base import GenerationOptions, LoadOptions
from runtimes.registry import open_runtime
from runtimes.torch_reference import TorchRuntime


def test_mcnemar_one_sided_exact_p_values():
    # by hand: n discordant pairs, P(X >= lost) for X ~ Binomial(n, 1/2)
    assert mcnemar_p(6, 0) == pytest.approx(1 / 64)
    assert mcnemar_p(5, 1) == pytest.approx((6 + 1) / 64)
    assert mcnemar_p(3, 3) == pytest.approx((20 + 15 + 6 + 1) / 64)
    assert mcnemar_p(0, 4) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(17, 7) == pytest.approx(0.0320, abs=1e-4)  # 2^-24 * sum_{k>=17} C(24, k)


def test_the_builtin_prompts_cover_every_category_and_check_their_own_expected_answers():
    tasks = builtin_tasks()
    assert len(tasks) >= 150 and len({t.id for t in tasks}) == len(tasks)
    counts = Counter(t.category for t in tasks)
    assert set(counts) == {"facts", "arithmetic", "units", "format", "json", "summary", "multi-turn", "languages"}
    assert all(t.messages and t.builtin for t in tasks)
    assert sum(1 for t in tasks if len([m for m in t.messages if m["role"] == "user"]) > 1) >= 10
    checkable = [t for t in tasks if t.checkable]
    assert len(checkable) >= 140
    for task in checkable:  # the expected answer, written out as a model would, passes its own check
        written = _written_out(task.expected, task.match)
        assert is_correct(written, task), task.id


def _written_out(expected, match: str) -> str:
    if match == "contains":
        return f"I think it is {expected[0] if isinstance(expected, list) else expected}."
    if match == "number":
        return f"The answer is {expected}."
    return json.dumps(expected) if match == "json" else str(expected)


def test_answer_checks():
    def task(expected, match):
        return Task(line=1, prompt="q", messages=None, expected=expected, match=match, max_tokens=8)

    number = task(12, "number")
    assert is_correct("7 + 5 = 12", number) and is_correct("It is 12.", number)
    assert not is_correct("12 + 1 = 13", number) and not is_correct("twelve", number)
    assert is_correct("That makes 1,200 grams", task(1200, "number"))
    assert is_correct("0.5 kilograms", task(0.5, "number"))
    assert is_correct("the capital is rome", task(["Rome", "Roma"], "contains"))
    assert is_correct("Roma!", task(["Rome", "Roma"], "contains"))
    assert not is_correct("Milan", task(["Rome"], "contains"))
    assert is_correct('Here: {"a": 1}', task({"a": 1}, "json")) and not is_correct('{"a": 2}', task({"a": 1}, "json"))
    assert is_correct(" OK \n", task("OK", "exact")) and not is_correct("OK.", task("OK", "exact"))
    assert is_correct("anything", Task(1, "q", None, None, None, 8)) is None


def test_a_user_tasks_file_is_checked_line_by_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    for line, message in [(json.dumps({"prompt": "x", "expected": 3, "match": "contains"}), "string or a list"),
                          (json.dumps({"prompt": "x", "expected": "3", "match": "number"}), "as a number"),
                          (json.dumps({"prompt": "x", "expected": "3", "max_tokens": 0}), "positive whole number")]:
        bad.write_text(line + "\n")
        with pytest.raises(EdgepackError, match=message):
            load_tasks(bad)


def test_first_divergence_treats_every_end_token_alike():
    eos = frozenset({2, 7})
    assert first_divergence(np.array([5, 6, 7]), [5, 6, 2], eos) is None
    assert first_divergence(np.array([5, 9, 2]), [5, 6, 2], eos) == 1
    assert first_divergence(np.array([5, 6, 4]), [5, 6, 2], eos) == 2


def _behaviour(**changes) -> BehaviourQuality:
    good = BehaviourQuality(prompts=160, identical=120, answer_tokens=3000, answer_kld_mean=0.004,
                            answer_kld_ci=(0.0035, 0.0045), answer_same_top1=0.97, median_first_divergence=6.0,
                            checkable=150, correct=77, reference_correct=74, only_reference_correct=4,
                            only_variant_correct=7, mcnemar_p=mcnemar_p(4, 7), differences=())
    return replace(good, **changes)


def _quality(behaviour: BehaviourQuality | None) -> VariantQuality:
    return VariantQuality(name="v", path=None, engine="e", perplexity=10.0, ppl_ratio=1.01, kld_mean=0.01,
                          kld_p99=0.1, same_top1=0.95, rms_delta_p=0.01, task_accuracy=None, passed=False, reasons=(),
                          seconds=1.0, ppl_ratio_ci=(1.0, 1.02), kld_mean_ci=(0.009, 0.011), behaviour=behaviour)


def test_the_gate_judges_answers_one_good_one_bad():
    gate = Gate()
    assert gate.reasons(_quality(_behaviour())) == () and gate.reasons(_quality(None)) == ()
    lost = _behaviour(correct=64, only_reference_correct=17, only_variant_correct=7, mcnemar_p=mcnemar_p(17, 7))
    (reason,) = gate.reasons(_quality(lost))
    assert "right on 64 of 150" in reason and "McNemar p=0.032" in reason
    (reason,) = gate.reasons(_quality(_behaviour(answer_kld_mean=0.09, answer_kld_ci=(0.08, 0.11))))
    assert "answers up to 0.1100" in reason
    assert Gate(correctness_alpha=0.0).reasons(_quality(lost)) == ()  # the test turned off
    with pytest.raises(EdgepackError, match="correctness-alpha"):
        Gate.from_options(correctness_alpha=1.5)


USER_TASKS = [
    {"messages": [{"role": "user", "content": "Name a colour."}], "expected": "red", "max_tokens": 6},
    {"messages": [{"role": "user", "content": "Count to three."}], "expected": 3, "match": "number", "max_tokens": 6},
    {"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi"},
                  {"role": "user", "content": "What did I say?"}], "expected": "hello", "max_tokens": 6},
    {"prompt": "Once upon a time", "expected": "upon", "max_tokens": 6},
    {"messages": [{"role": "user", "content": "Say yes."}], "expected": "yes", "max_tokens": 6},
    {"messages": [{"role": "user", "content": "Give JSON."}], "expected": {"a": 1}, "match": "json", "max_tokens": 6},
]


def test_answers_on_real_engines_match_their_own_greedy_generation(tiny_model, tiny_variants, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text("".join(json.dumps(t) + "\n" for t in USER_TASKS))
    tasks = load_tasks(tasks_file)
    model = tiny_model("qwen3-bpe")
    kinds = ("gguf-f32", "onnx-fp32", "gguf-q4_k_m")
    report = evaluate(model, [tiny_variants[k] for k in kinds], EvalOptions(
        eval_text="The keeper counted the ships every evening, and wrote the number in a book. " * 4, window=128,
        tasks=tuple(tasks), behaviour=False, show_progress=False))
    assert report.behaviour_prompts == len(USER_TASKS) and report.behaviour_skipped == ()
    quality = {v.name: v for v in report.variants}

    reference = TorchRuntime(model, LoadOptions(threads=1))
    expected_text = {t.id: reference.complete(prompt_ids_for(reference, t), GenerationOptions(max_tokens=t.max_tokens))
                     .text for t in tasks}
    reference.close()
    for kind in kinds:
        behaviour = quality[kind].behaviour
        runtime = open_runtime(tiny_variants[kind], LoadOptions(threads=1, context_length=128))
        own = {t.id: runtime.complete(prompt_ids_for(runtime, t), GenerationOptions(max_tokens=t.max_tokens)).text
               for t in tasks}
        runtime.close()
        identical = sum(own[t.id] == expected_text[t.id] for t in tasks)
        assert behaviour.identical == identical, kind
        right = sum(bool(is_correct(own[t.id], t)) for t in tasks)
        assert behaviour.correct == right and quality[kind].task_accuracy == pytest.approx(right / len(tasks))
        for difference in behaviour.differences:
            assert difference.variant == own[difference.id].strip()
            assert difference.reference == expected_text[difference.id].strip()
    for kind in ("gguf-f32", "onnx-fp32"):  # full precision: the reference's answers, token for token
        assert quality[kind].behaviour.identical == len(USER_TASKS)
        assert quality[kind].behaviour.answer_kld_mean < 1e-4 and quality[kind].behaviour.mcnemar_p == 1.0
    assert quality["gguf-q4_k_m"].behaviour.answer_kld_mean > 10 * quality["gguf-f32"].behaviour.answer_kld_mean
    assert report.reference_task_accuracy == pytest.approx(
        sum(bool(is_correct(expected_text[t.id], t)) for t in tasks) / len(tasks))


def test_builtin_prompts_are_asked_of_chat_models_and_left_out_with_a_reason_when_too_long(tiny_model, tiny_variants,
                                                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    report = evaluate(tiny_model("qwen3-bpe"), [tiny_variants["gguf-f32"]], EvalOptions(
        eval_text="A short text about boats and the sea, read twice. " * 4, window=64, show_progress=False))
    total = len(builtin_tasks())
    assert report.behaviour_prompts + len(report.behaviour_skipped) == total
    assert report.behaviour_skipped and all("do not fit the 64-token context" in s for s in report.behaviour_skipped)
    (variant,) = report.variants
    assert (variant.behaviour is None) == (report.behaviour_prompts == 0)
