"""What each ONNX kind's weights become in our decode-optimized graph (converters/onnx/decoder_graph.py).

- onnx-fp32: every weight float32; a tied output head reads the embedding table itself.
- onnx-int8: weight-only 8-bit blocks of 32 everywhere (MatMulNBits with int8 compute), the output head and the
  embedding included (one table serves both when the model ties them).
- onnx-int4: the mixed recipe below, chosen by measurement on the demo student (see the issue note): 4-bit
  blocks for the projections, rounded with GPTQ on the calibration text (never the evaluation text); the value
  and down projections, the output head and the embedding at 8 bits.

`imatrix=False` (`--no-imatrix`) rounds every block to nearest instead, with no calibration text.
"""

from __future__ import annotations

from converters.onnx.decoder_graph import PrecisionPlan, WeightPrecision

RECIPE_VERSION = 1  # raise when a kind's plan changes, so cached variants are rebuilt


def precision_plan(kind: str, int4_block_size: int = 32, imatrix: bool = True) -> PrecisionPlan:
    if kind == "onnx-fp32":
        return PrecisionPlan()
    if kind == "onnx-int8":
        eight = WeightPrecision(bits=8, block_size=32)
        return PrecisionPlan(linear=eight, head=eight, embedding=eight)
    if kind == "onnx-int4":
        four = WeightPrecision(bits=4, block_size=int4_block_size, rounding="gptq" if imatrix else "nearest")
        eight = WeightPrecision(bits=8, block_size=32, rounding="gptq" if imatrix else "nearest")
        table = WeightPrecision(bits=8, block_size=32, rounding="search" if imatrix else "nearest")
        return PrecisionPlan(linear=four, overrides={"v": eight, "down": eight}, head=table, embedding=table)
    raise ValueError(f"no precision plan for {kind!r}")


def _quantized(plan: PrecisionPlan) -> list[WeightPrecision]:
    return [p for p in (plan.linear, plan.head, plan.embedding, *plan.overrides.values()) if p.bits is not None]


def plan_uses_calibration(plan: PrecisionPlan) -> bool:
    return any(p.rounding != "nearest" for p in _quantized(plan))


def plan_needs_grams(plan: PrecisionPlan) -> bool:
    return any(p.rounding == "gptq" for p in _quantized(plan))
