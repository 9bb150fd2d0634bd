"""The quality stage: every variant against the same reference logits of the original model."""
