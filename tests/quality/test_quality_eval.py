"""The quality stage on real runtimes: full-precision variants score ~0, quantized ones more; tasks; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from edgepack.core.errors import EdgepackError
from edgepack.quality import reference as reference_module
from edgepack.quality.evaluate import EvalOptions, evaluate
from edgepack.quality.gate import Gate
from edgepack.quality.tasks import builtin_tasks, is_correct, load_tasks

SHORT_TEXT = ("The lighthouse keeper counted the ships every evening. On Tuesday there were 12 fishing boats, "
              "3 ferries and one old sailing yacht. Shopping list: bread, flour, eggs and honey. ") * 6


def test_full_precision_variants_match_the_reference(tiny_model, tiny_variants):
    report = evaluate(tiny_model("qwen3-bpe"), [tiny_variants["gguf-f32"], tiny_variants["onnx-fp32"],
                                                tiny_variants["gguf-q4_k_m"], tiny_variants["onnx-int4"]],
                      EvalOptions(eval_text=SHORT_TEXT, window=64, show_progress=False))
    by_name = {v.name: v for v in report.variants}
    for name in ("gguf-f32", "onnx-fp32"):
        assert by_name[name].kld_mean <= 1e-4
        assert by_name[name].ppl_ratio == pytest.approx(1.0, abs=1e-3)
        assert by_name[name].same_top1 > 0.97
    for name in ("gguf-q4_k_m", "onnx-int4"):  # quantized: on the same scale, and visibly worse
        assert by_name[name].kld_mean > 10 * by_name["gguf-f32"].kld_mean
        assert by_name[name].rms_delta_p > by_name["gguf-f32"].rms_delta_p
    # the second half of each window is scored (as llama.cpp's perplexity tool does): of a full window of 64
    # tokens, the predictions made at positions 32..62; the last window is shorter
    full, last = divmod(report.eval_tokens, 64)
    assert report.window == 64 and report.positions_scored == full * (64 - 1 - 32) + max(0, last - 1 - last // 2)
    for name in ("gguf-f32", "gguf-q4_k_m"):
        low, high = by_name[name].kld_mean_ci
        assert low <= by_name[name].kld_mean <= high and high - low < by_name[name].kld_mean + 1e-3


def test_reference_is_computed_once_per_model_and_text(tiny_model, tiny_variants, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path))
    calls = {"n": 0}
    real = reference_module.reference_positions

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(reference_module, "reference_positions", counting)
    first = evaluate(tiny_model("qwen3-bpe"), [tiny_variants["gguf-f32"]],
                     EvalOptions(eval_text=SHORT_TEXT, window=64, show_progress=False))
    computed = calls["n"]
    assert computed > 0 and list((tmp_path / "reference").glob("*.npz"))
    second = evaluate(tiny_model("qwen3-bpe"), [tiny_variants["gguf-f32"]],
                      EvalOptions(eval_text=SHORT_TEXT, window=64, show_progress=False))
    assert calls["n"] == computed  # read from the cache
    assert second.variants[0].kld_mean == first.variants[0].kld_mean
    evaluate(tiny_model("qwen3-bpe"), [tiny_variants["gguf-f32"]],
             EvalOptions(eval_text=SHORT_TEXT + " More.", window=64, show_progress=False))
    assert calls["n"] > computed  # another text, another reference


def test_gate_fails_with_reasons(tiny_model, tiny_variants):
    report = evaluate(tiny_model("qwen3-bpe"), [tiny_variants["gguf-q4_k_m"]], EvalOptions(
        eval_text=SHORT_TEXT, window=64, gate=Gate(max_ppl_increase=-0.5, max_kld=0.0), show_progress=False))
    (variant,) = report.variants
    assert not variant.passed and not report.passing
    assert any("perplexity" in r for r in variant.reasons) and any("KL divergence" in r for r in variant.reasons)


def test_tasks_file_parsing_and_matching(tmp_path):
    good = tmp_path / "tasks.jsonl"
    good.write_text("\n".join([
        json.dumps({"prompt": "2+2=", "expected": "4", "match": "contains"}),
        json.dumps({"messages": [{"role": "user", "content": "Say hi"}], "expected": "hi", "match": "exact"}),
        json.dumps({"prompt": "JSON please", "expected": {"a": [1, 2]}, "match": "json"}),
    ]) + "\n")
    tasks = load_tasks(good)
    assert [t.match for t in tasks] == ["contains", "exact", "json"]
    assert is_correct("The answer is 4.", tasks[0]) and not is_correct("five", tasks[0])
    assert is_correct("  hi \n", tasks[1]) and not is_correct("hi there", tasks[1])
    assert is_correct('Sure: {"a": [1, 2]} done', tasks[2]) and not is_correct('{"a": [2, 1]}', tasks[2])
    bad = tmp_path / "bad.jsonl"
    for line, message in [("{not json", "bad.jsonl:1 is not valid JSON"),
                          (json.dumps({"expected": "x"}), "exactly one of"),
                          (json.dumps({"prompt": "x"}), "\"expected\" is missing"),
                          (json.dumps({"prompt": "x", "expected": "y", "match": "regex"}), "not one of")]:
        bad.write_text(line + "\n")
        with pytest.raises(EdgepackError, match=message):
            load_tasks(bad)


def test_task_accuracy_on_stories(stories_dir, stories_variants, tmp_path):
    f32 = stories_variants["gguf-f32"]
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text("\n".join([
        json.dumps({"prompt": "Once upon a time, there was a little girl named", "expected": "Lily",
                    "max_tokens": 8}),
        json.dumps({"prompt": "Once upon a time", "expected": "dragon", "max_tokens": 8}),
    ]) + "\n")
    report = evaluate(stories_dir, [f32.path], EvalOptions(
        eval_text=SHORT_TEXT, window=128, tasks=tuple(load_tasks(tasks_file)), gate=Gate(min_task_accuracy=0.5),
        show_progress=False))
    assert report.reference_task_accuracy == 0.5
    assert report.variants[0].task_accuracy == 0.5 and report.variants[0].passed


def test_stories_full_precision_kld_is_zero(stories_dir, stories_variants):
    made = [stories_variants[kind] for kind in ("gguf-f32", "onnx-fp32", "onnx-int8")]
    report = evaluate(stories_dir, [v.path for v in made], EvalOptions(window=256, show_progress=False))
    by_name = {v.name: v for v in report.variants}
    assert by_name["gguf-f32"].kld_mean <= 1e-4 and by_name["onnx-fp32"].kld_mean <= 1e-4
    assert by_name["gguf-f32"].ppl_ratio == pytest.approx(1.0, abs=1e-3)
    assert by_name["onnx-fp32"].ppl_ratio == pytest.approx(1.0, abs=1e-3)
    assert by_name["onnx-int8"].kld_mean > by_name["onnx-fp32"].kld_mean


def test_eval_cli_json_and_exit_codes(stories_dir, stories_variants, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(SHORT_TEXT)

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "edgepack", "eval", str(stories_dir),
                               str(stories_variants["gguf-f32"].path), "--eval-text", str(text), "--context", "128",
                               *extra], capture_output=True, text=True, timeout=600)

    ok = run("--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["variants"][0]["passed"] is True and report["variants"][0]["kld_mean"] < 1e-4
    assert report["gate"] == {"max_ppl_increase": 0.05, "max_kld": 0.05, "min_task_accuracy": None,
                              "max_answer_kld": 0.10, "correctness_alpha": 0.05}
    nothing = run("--max-ppl-increase", "-1%")
    assert nothing.returncode == 5 and "no variant passes" in nothing.stderr
    assert "fails the gate: perplexity" in nothing.stdout
    bad = run("--max-ppl-increase", "lots")
    assert bad.returncode == 2 and "not a number or a percentage" in bad.stderr


@pytest.mark.slow
def test_demo_student_quantization_ordering(demo_conversion):
    """On the demo student: KLD of F16 <= Q8_0 <= Q4_K_M against the same reference."""
    from edgepack.student.demo import demo_student

    result, variants = demo_conversion
    assert result.returncode == 0, result.stderr[-3000:]
    model = demo_student()
    paths = [variants / f"{kind}.gguf" for kind in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m")]
    facts = [task for task in builtin_tasks() if task.category == "facts"][:8]  # a few of the behaviour prompts
    report = evaluate(model, paths, EvalOptions(
        window=256, show_progress=False, eval_text=reference_module.DEFAULT_EVAL_TEXT.read_text()[:4000],
        behaviour=False, tasks=tuple(replace(task, builtin=False) for task in facts)))
    kld = {v.name: v.kld_mean for v in report.variants}
    assert kld["gguf-f16"] <= kld["gguf-q8_0"] <= kld["gguf-q4_k_m"]
    assert report.variants[0].ppl_ratio == pytest.approx(1.0, abs=0.01)
    answers = {v.name: v.behaviour for v in report.variants}
    assert answers["gguf-f16"].answer_kld_mean <= answers["gguf-q8_0"].answer_kld_mean \
        <= answers["gguf-q4_k_m"].answer_kld_mean
    assert answers["gguf-f16"].identical >= answers["gguf-q4_k_m"].identical


def test_variants_stop_reading_once_their_intervals_are_tight_and_compare_over_what_they_read(tiny_model,
                                                                                              tiny_variants):
    from edgepack.quality.evaluate import MIN_WINDOWS
    from edgepack.quality.metrics import KLD_RELATIVE_HALF_WIDTH, PPL_RATIO_HALF_WIDTH
    from edgepack.quality.reference import first_scored, make_windows
    from runtimes.base import LoadOptions
    from runtimes.torch_reference import TorchRuntime

    text = SHORT_TEXT * 24
    model = tiny_model("qwen3-bpe")
    kinds = ("gguf-f32", "gguf-q4_k_m", "onnx-int4")
    report = evaluate(model, [tiny_variants[k] for k in kinds], EvalOptions(eval_text=text, window=64,
                                                                           behaviour=False, show_progress=False))
    reference = TorchRuntime(model, LoadOptions(threads=1))
    windows = make_windows(reference, text, 64).windows
    per_window = []  # the reference's log-probability of each next token, window by window, computed anew here
    for tokens in windows:
        first = first_scored(len(tokens))
        logits = reference.logits(tokens).astype(np.float64)[first:-1]
        logprobs = logits - logits.max(axis=1, keepdims=True)
        logprobs -= np.log(np.exp(logprobs).sum(axis=1, keepdims=True))
        per_window.append(logprobs[np.arange(len(tokens) - 1 - first), list(tokens[first + 1:])])
    reference.close()
    assert len(windows) > 2 * MIN_WINDOWS
    read = np.cumsum([len(logprobs) for logprobs in per_window])
    for variant in report.variants:
        assert variant.positions_scored in read, "a variant reads whole windows"
        count = int(np.searchsorted(read, variant.positions_scored)) + 1
        assert count >= MIN_WINDOWS
        ppl = float(np.exp(-np.concatenate(per_window[:count]).mean()))
        assert variant.ppl_ratio == pytest.approx(variant.perplexity / ppl, rel=1e-4)
        if count < len(windows):  # stopped early: both intervals were as tight as the rule asks
            assert (variant.kld_mean_ci[1] - variant.kld_mean_ci[0]) / 2 <= KLD_RELATIVE_HALF_WIDTH * variant.kld_mean
            assert (variant.ppl_ratio_ci[1] - variant.ppl_ratio_ci[0]) / 2 <= PPL_RATIO_HALF_WIDTH
    assert len({v.positions_scored for v in report.variants}) > 1  # precise and noisy variants stop apart
