"""Comparing a converted model's logits with the reference's: one rule for every format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.core.errors import ParityError


@dataclass(frozen=True)
class LogitParity:
    positions: int
    max_abs_diff: float
    tolerance: float
    argmax_agreement: float  # share of positions whose argmax matches


def compare_logits(expected: np.ndarray, got: np.ndarray, label: str,
                   relative_tolerance: float = 2e-3) -> LogitParity:
    """Within `relative_tolerance` of the largest reference logit everywhere, and the same argmax at every
    position whose top-two reference logits are further apart than that (a near-tie may flip under rounding)."""
    got = got[:, : expected.shape[1]]
    tolerance = relative_tolerance * max(1.0, float(np.abs(expected).max()))
    max_diff = float(np.abs(expected - got).max())
    top2 = np.sort(expected, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > tolerance
    same_argmax = expected.argmax(-1) == got.argmax(-1)
    if max_diff > tolerance or not same_argmax[decisive].all():
        bad = np.where(decisive & ~same_argmax)[0].tolist()
        raise ParityError(f"logit parity failed for {label}: max |difference| = {max_diff:.3g} "
                          f"(tolerance {tolerance:.3g}); argmax differs at positions {bad[:10]}")
    return LogitParity(positions=int(expected.shape[0]), max_abs_diff=max_diff, tolerance=tolerance,
                       argmax_agreement=float(same_argmax.mean()))


def check_logit_parity(variant_path: Path, model_path: Path, max_positions: int = 64) -> LogitParity:
    """A full-precision variant (GGUF F32, ONNX FP32) against transformers on the first tokens of the probe text,
    each through its own runtime."""
    from converters.probe_text import PROBE_TEXT
    from runtimes.base import LoadOptions
    from runtimes.registry import open_runtime
    from runtimes.torch_reference import TorchRuntime

    reference = TorchRuntime(Path(model_path))
    token_ids = reference.tokenize(PROBE_TEXT)[: min(max_positions, reference.context_length)]
    expected = reference.logits(token_ids)
    reference.close()
    variant = open_runtime(Path(variant_path), LoadOptions(context_length=max(len(token_ids), 32)))
    try:
        got = variant.logits(token_ids)
    finally:
        variant.close()
    return compare_logits(expected, got, label=f"{Path(variant_path).name} ({variant.name} vs transformers)")
