"""Stage 2, quality: every variant against the same reference logits of the original model, and the gate."""

from edgepack.quality.evaluate import evaluate

__all__ = ["evaluate"]
