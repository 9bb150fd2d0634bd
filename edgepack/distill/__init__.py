"""Stage 0, distill: a student from a teacher (logit and sequence-level knowledge distillation).

`distill(DistillOptions) -> DistillResult`; the student is a Hugging Face folder that `edgepack build` takes as
it is, with distill.json (what was done, before/after metrics) and report.md beside its weights.
"""

from edgepack.distill.options import DistillOptions, DistillResult
from edgepack.distill.run import distill

__all__ = ["DistillOptions", "DistillResult", "distill"]
