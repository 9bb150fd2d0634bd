"""The quality stage's entry point: evaluate(model, variants) -> QualityReport."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgepack.core.artifacts import CrashedVariant, QualityReport, VariantQuality
from edgepack.core.errors import EngineCrashedError
from edgepack.core.isolation import call_isolated, start_isolation
from edgepack.core.progress import progress_bar, say
from edgepack.quality.behaviour import (
    ReferenceAnswers,
    reference_answers,
    score_answers,
    summarise_behaviour,
    task_accuracy,
)
from edgepack.quality.gate import Gate
from edgepack.quality.metrics import (
    ReferencePositions,
    bootstrap_intervals,
    perplexity,
    precise_enough,
    score_positions,
    summarise,
)
from edgepack.quality.reference import (
    DEFAULT_EVAL_TEXT,
    DEFAULT_TOP_K,
    EvalWindows,
    first_scored,
    make_windows,
    model_fingerprint,
    reference_for,
    text_sha256,
)
from edgepack.quality.tasks import Task, builtin_tasks
from runtimes.base import LoadOptions
from runtimes.registry import open_runtime
from runtimes.torch_reference import TorchRuntime

DEFAULT_WINDOW = 512
MIN_WINDOWS = 8  # read before a variant may stop early (about 2,000 scored positions at 512 tokens)
# the diverging behaviour prompts a variant answers at once, on an engine that batches (decoding one sequence reads
# all the weights per token; eight read them once for eight tokens)
ANSWERS_AT_ONCE = 8


def variant_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


@dataclass(frozen=True)
class EvalOptions:
    eval_text: str | None = None  # None: edgepack's built-in text
    tasks: tuple[Task, ...] = ()  # the user's own, with expected answers
    behaviour: bool = True  # ask the built-in behaviour prompts (when the model has a chat template)
    gate: Gate = field(default_factory=Gate)
    window: int | None = None  # evaluation window in tokens; None: DEFAULT_WINDOW (capped at the model's context)
    threads: int | None = None
    top_k: int = DEFAULT_TOP_K  # reference log-probabilities kept per position
    show_progress: bool = True

    def behaviour_tasks(self, has_chat_template: bool) -> list[Task]:
        """What the reference and every variant are asked: the built-in prompts (chat messages), then the user's."""
        return (builtin_tasks() if self.behaviour and has_chat_template else []) + list(self.tasks)

    @property
    def text(self) -> str:
        return self.eval_text if self.eval_text is not None else DEFAULT_EVAL_TEXT.read_text(encoding="utf-8")


def split_reference(paths: list[Path]) -> tuple[Path | None, list[Path]]:
    """`edgepack eval [MODEL] VARIANT...`: the first path is the reference model when it is a Hugging Face
    directory (transformers loads it) and variants follow; else every path is a variant."""
    if len(paths) >= 2 and TorchRuntime.can_load(paths[0]):
        return paths[0], list(paths[1:])
    return None, list(paths)


def evaluate(model_path: Path, variant_paths: list[Path], options: EvalOptions | None = None,
             on_variant: Callable[[VariantQuality, dict], None] | None = None) -> QualityReport:
    """`on_variant(result, reference)` is called with each variant's result as soon as it is measured, and the
    report-wide fields (the reference's perplexity, the tokens scored, ...), so the build can cache it whole."""
    options = options or EvalOptions()
    gate, tasks, threads, top_k, show_progress = (options.gate, list(options.tasks), options.threads, options.top_k,
                                                  options.show_progress)
    text = options.text
    if variant_paths:
        start_isolation()  # the scoring children's server loads its libraries while the reference computes
    reference = TorchRuntime(Path(model_path), LoadOptions(threads=threads))
    window = min(options.window or DEFAULT_WINDOW, reference.context_length)
    windows = make_windows(reference, text, window)
    with progress_bar("reference logits", len(windows.windows), show_progress) as advance:
        ref_positions = reference_for(reference, Path(model_path), text, windows, window, top_k,
                                      on_window=lambda: advance(1))
    reference_ppl = perplexity(np.concatenate([p.target_logprobs for p in ref_positions]))
    prompts = options.behaviour_tasks(reference.has_chat_template())
    with progress_bar("reference answers", len(prompts), show_progress and bool(prompts)) as advance:
        answers = reference_answers(reference, model_fingerprint(Path(model_path)), prompts, window, top_k,
                                    on_prompt=lambda: advance(1))
    reference_accuracy = task_accuracy(answers.answers, [a.correct for a in answers.answers])
    reference.close()
    del reference
    gc.collect()
    outside = float(np.mean(np.exp(np.concatenate([p.rest_logmass for p in ref_positions]).astype(np.float64))))
    shared = {"eval_text_sha256": text_sha256(text), "eval_tokens": sum(len(w) for w in windows.windows),
              "positions_scored": windows.positions, "window": window, "top_k_stored": top_k,
              "outside_top_k_mass": outside,
              "reference_perplexity": reference_ppl, "reference_task_accuracy": reference_accuracy,
              "tasks": len(tasks or []), "behaviour_prompts": len(answers.answers),
              "behaviour_checkable": sum(1 for a in answers.answers if a.correct is not None),
              "reference_behaviour_correct": sum(1 for a in answers.answers if a.correct),
              "behaviour_skipped": answers.skipped}

    results, crashed = [], []
    for path in map(Path, variant_paths):
        try:
            scored = call_isolated(f"scoring {variant_name(path)}", score_variant, path, windows, ref_positions,
                                   answers, window, threads, show_progress)
        except EngineCrashedError as exc:
            crashed.append(CrashedVariant(name=variant_name(path), path=path, stage="quality", cause=exc.cause,
                                          detail=str(exc)))
            if show_progress:
                say(f"{variant_name(path)}: CRASHED: {exc}")
            continue
        reasons = gate.reasons(scored)
        results.append(replace(scored, passed=not reasons, reasons=reasons))
        if on_variant is not None:
            on_variant(results[-1], shared)
        if show_progress:
            verdict = "pass" if results[-1].passed else "FAIL: " + "; ".join(reasons)
            say(f"{results[-1].name}: mean KLD {scored.kld_mean:.4f} [{scored.kld_mean_ci[0]:.4f}, "
                f"{scored.kld_mean_ci[1]:.4f}], PPL x{scored.ppl_ratio:.3f} [{scored.ppl_ratio_ci[0]:.3f}, "
                f"{scored.ppl_ratio_ci[1]:.3f}]: {verdict}")
    return QualityReport(model=Path(model_path), gate=gate.as_dict(), variants=tuple(results), **shared,
                         crashed=tuple(crashed))


def score_variant(path: Path, windows: EvalWindows, ref_positions: list[ReferencePositions],
                  answers: ReferenceAnswers, window: int, threads: int | None, show_progress: bool) -> VariantQuality:
    """One variant against the reference, ungated; run in a child process (edgepack.core.isolation). It reads the
    windows in order and stops once its intervals are tight (metrics.precise_enough), after MIN_WINDOWS at least."""
    started = time.perf_counter()
    runtime = open_runtime(path, LoadOptions(threads=threads, context_length=window, parallel=ANSWERS_AT_ONCE))
    scores = []
    with progress_bar(f"{variant_name(path)} ({runtime.name})", len(windows.windows), show_progress) as advance:
        for tokens, positions in zip(windows.windows, ref_positions, strict=True):
            scores.append(score_positions(positions, runtime.logits_from(tokens, first_scored(len(tokens)))[:-1]))
            advance(1)
            if len(scores) >= MIN_WINDOWS and len(scores) % 2 == 0 and len(scores) < len(windows.windows):
                so_far = bootstrap_intervals(_reference_logprobs(ref_positions[:len(scores)]), scores)
                if precise_enough(so_far, float(np.concatenate([s.kld for s in scores]).mean())):
                    break  # tight enough: the rest of the text would only narrow the intervals
    read = ref_positions[:len(scores)]
    summary = summarise(scores)
    reference_ppl = perplexity(_reference_logprobs(read))  # over the same positions as the variant's
    intervals = bootstrap_intervals(_reference_logprobs(read), scores)
    behaviour, accuracy = None, None
    if answers.answers:
        answer_scores = score_answers(runtime, answers.answers, lambda label, total: progress_bar(
            f"{variant_name(path)} {label}", total, show_progress))
        accuracy = task_accuracy(answers.answers, [s.correct for s in answer_scores])
        behaviour = summarise_behaviour(answers.answers, answer_scores)
    runtime.close()
    return VariantQuality(
        name=variant_name(path), path=path, engine=runtime.name, perplexity=summary.perplexity,
        ppl_ratio=summary.perplexity / reference_ppl, kld_mean=summary.kld_mean, kld_p99=summary.kld_p99,
        same_top1=summary.same_top1, rms_delta_p=summary.rms_delta_p, task_accuracy=accuracy, passed=False,
        reasons=(), seconds=time.perf_counter() - started, ppl_ratio_ci=intervals.ppl_ratio,
        kld_mean_ci=intervals.kld_mean, behaviour=behaviour, positions_scored=sum(len(s.kld) for s in scores))


def _reference_logprobs(positions: list[ReferencePositions]) -> np.ndarray:
    return np.concatenate([p.target_logprobs for p in positions])

