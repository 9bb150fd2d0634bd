"""The pass/fail gate a variant must clear to be shipped."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgepack.core.artifacts import QualityReport, VariantQuality
from edgepack.core.errors import EdgepackError, NothingPassedError


@dataclass(frozen=True)
class Gate:
    max_ppl_increase: float = 0.05  # perplexity may rise by at most this fraction over the reference's
    max_kld: float = 0.05  # mean KL divergence (nats per token) from the reference
    min_task_accuracy: float | None = None  # absolute share of tasks answered right, when tasks are given
    # mean KL divergence on the reference's answers to the behaviour prompts: twice max_kld, since on the demo's six
    # variants it ran 1.05-1.14x their KL divergence on prose
    max_answer_kld: float = 0.10
    correctness_alpha: float = 0.05  # fail when McNemar's test says "right less often than the reference" at this level

    @classmethod
    def from_options(cls, max_ppl_increase: str = "5%", max_kld: float = 0.05,
                     min_task_accuracy: str | None = None, max_answer_kld: float = 0.10,
                     correctness_alpha: float = 0.05) -> Gate:
        """The gate from the command line's words: percentages or fractions."""
        if not 0 <= correctness_alpha < 1:
            raise EdgepackError(f"--correctness-alpha: {correctness_alpha} is not in [0, 1) (0 turns the test off)")
        return cls(max_ppl_increase=parse_fraction(max_ppl_increase, "--max-ppl-increase"), max_kld=max_kld,
                   min_task_accuracy=parse_fraction(min_task_accuracy, "--min-task-accuracy")
                   if min_task_accuracy is not None else None, max_answer_kld=max_answer_kld,
                   correctness_alpha=correctness_alpha)

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def reasons(self, quality: VariantQuality) -> tuple[str, ...]:
        """Why a variant fails (empty: it passes). The perplexity ratio and the two KL divergences are judged on the
        upper ends of their 95% intervals: a variant passes only when it is within the limits with that
        confidence, not when its measured mean happens to be."""
        failed = []
        ppl_ratio, kld_mean = quality.ppl_ratio_ci[1], quality.kld_mean_ci[1]
        if ppl_ratio - 1.0 > self.max_ppl_increase:
            failed.append(f"perplexity up to +{(ppl_ratio - 1) * 100:.2f}% (upper end of its 95% interval) > "
                          f"+{self.max_ppl_increase * 100:.2f}% allowed")
        if kld_mean > self.max_kld:
            failed.append(f"mean KL divergence up to {kld_mean:.4f} (upper end of its 95% interval) > "
                          f"{self.max_kld:.4f} allowed")
        if self.min_task_accuracy is not None and quality.task_accuracy is not None \
                and quality.task_accuracy < self.min_task_accuracy:
            failed.append(f"task accuracy {quality.task_accuracy:.1%} < {self.min_task_accuracy:.1%} required")
        behaviour = quality.behaviour
        if behaviour is not None:
            if behaviour.answer_kld_ci[1] > self.max_answer_kld:
                failed.append(f"KL divergence on the reference's answers up to {behaviour.answer_kld_ci[1]:.4f} "
                              f"(upper end of its 95% interval) > {self.max_answer_kld:.4f} allowed")
            if behaviour.mcnemar_p < self.correctness_alpha:
                failed.append(f"right on {behaviour.correct} of {behaviour.checkable} checkable prompts where the "
                              f"reference is right on {behaviour.reference_correct} (it lost "
                              f"{behaviour.only_reference_correct}, gained {behaviour.only_variant_correct}; "
                              f"McNemar p={behaviour.mcnemar_p:.3g} < {self.correctness_alpha:g})")
        return tuple(failed)


def parse_fraction(text: str, what: str) -> float:
    """"5%" -> 0.05, "0.05" -> 0.05."""
    raw = text.strip()
    try:
        return float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError as exc:
        raise EdgepackError(f"{what}: {text!r} is not a number or a percentage (e.g. 5% or 0.05)") from exc


def require_a_pass(report: QualityReport) -> None:
    """Raise NothingPassedError (exit 5) when no variant of `report` passes its gate."""
    if not report.passing:
        raise NothingPassedError("no variant passes the quality gate")
