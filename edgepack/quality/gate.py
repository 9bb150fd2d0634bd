"""The pass/fail gate a variant must clear to be shipped."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgepack.core.artifacts import QualityReport
from edgepack.core.errors import EdgepackError, NothingPassedError


@dataclass(frozen=True)
class Gate:
    max_ppl_increase: float = 0.05  # perplexity may rise by at most this fraction over the reference's
    max_kld: float = 0.05  # mean KL divergence (nats per token) from the reference
    min_task_accuracy: float | None = None  # absolute share of tasks answered right, when tasks are given

    @classmethod
    def from_options(cls, max_ppl_increase: str = "5%", max_kld: float = 0.05,
                     min_task_accuracy: str | None = None) -> Gate:
        """The gate from the command line's words: percentages or fractions."""
        return cls(max_ppl_increase=parse_fraction(max_ppl_increase, "--max-ppl-increase"), max_kld=max_kld,
                   min_task_accuracy=parse_fraction(min_task_accuracy, "--min-task-accuracy")
                   if min_task_accuracy is not None else None)

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def reasons(self, ppl_ratio: float, kld_mean: float, task_accuracy: float | None) -> tuple[str, ...]:
        """Why a variant fails (empty: it passes). The quality stage passes the upper ends of the 95% intervals of
        the perplexity ratio and the mean KL divergence: a variant passes only when it is within the limits with
        that confidence, not when its measured mean happens to be."""
        failed = []
        if ppl_ratio - 1.0 > self.max_ppl_increase:
            failed.append(f"perplexity up to +{(ppl_ratio - 1) * 100:.2f}% (upper end of its 95% interval) > "
                          f"+{self.max_ppl_increase * 100:.2f}% allowed")
        if kld_mean > self.max_kld:
            failed.append(f"mean KL divergence up to {kld_mean:.4f} (upper end of its 95% interval) > "
                          f"{self.max_kld:.4f} allowed")
        if self.min_task_accuracy is not None and task_accuracy is not None \
                and task_accuracy < self.min_task_accuracy:
            failed.append(f"task accuracy {task_accuracy:.1%} < {self.min_task_accuracy:.1%} required")
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
