"""What each ONNX kind's weights become in our decode-optimized graph (converters/onnx/decoder_graph.py).

- onnx-fp32: every weight float32; a tied output head reads the embedding table itself.
- onnx-int8: weight-only 8-bit blocks of 32 everywhere (MatMulNBits with int8 compute), the output head and the
  embedding included (one table serves both when the model ties them).
- onnx-int4: 4-bit blocks of 32 with a float minimum per block (llama.cpp's Q4_1 form) for every projection,
  their range searched for the least error weighted by the calibration text's activations (never the
  evaluation text); the output head and the embedding at 8 bits (one shared table when tied).

Chosen by measurement on the demo student (mean KLD against transformers on 2,048 tokens of the evaluation
text, all at 8 bits but the named part at 4): with integer zero points, 4-bit v alone cost 0.047, down 0.026,
up 0.022, gate 0.013, q/k/o 0.004-0.006, and a whole model at 4 bits 0.13 (0.12 with a GPTQ pass); an integer zero point
cannot put a block's minimum where a Q4_1-dequantized model has it (its blocks hold 13 distinct values of 16 on
average). With the float minimum the whole 4-bit model scored 0.013, nearly all of it from MatMulNBits' int8
activations (accuracy level 4): at level 1 (float compute) it was 0.00013, but decode fell to 6 t/s. MatMulNBits'
own float zero points would hold the minimum too but run 60x slower on CPU (4.2 ms against 66 us for a 1536x576
product), so the graph adds each block's minimum times its input sum with a small MatMul of its own.

`imatrix=False` (`--no-imatrix`) rounds every block from its min..max range instead, with no calibration text.
"""

from __future__ import annotations

from converters.onnx.decoder_graph import PrecisionPlan, WeightPrecision

RECIPE_VERSION = 4  # raise when a kind's plan or a folder's files change, so cached variants are rebuilt


def precision_plan(kind: str, int4_block_size: int = 32, imatrix: bool = True) -> PrecisionPlan:
    if kind == "onnx-fp32":
        return PrecisionPlan()
    if kind == "onnx-int8":
        eight = WeightPrecision(bits=8, block_size=32)
        return PrecisionPlan(linear=eight, head=eight, embedding=eight)
    if kind == "onnx-int4":
        rounding = "search" if imatrix else "nearest"
        four = WeightPrecision(bits=4, block_size=int4_block_size, rounding=rounding, block_minimum=True)
        table = WeightPrecision(bits=8, block_size=32, rounding=rounding)
        return PrecisionPlan(linear=four, head=table, embedding=table)
    raise ValueError(f"no precision plan for {kind!r}")


def _quantized(plan: PrecisionPlan) -> list[WeightPrecision]:
    return [p for p in (plan.linear, plan.head, plan.embedding, *plan.overrides.values()) if p.bits is not None]


def plan_uses_calibration(plan: PrecisionPlan) -> bool:
    return any(p.rounding != "nearest" for p in _quantized(plan))
