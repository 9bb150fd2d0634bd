"""Block quantization in MatMulNBits' layout: hand-computed blocks, and ONNX Runtime's own kernels reading them."""

from __future__ import annotations

import numpy as np
import pytest

from converters.onnx.block_quant import dequantize_blocks, quantize_blocks, quantize_blocks_with_minimum


def test_a_block_rounds_to_nearest_over_its_range_by_hand():
    # one block of 16: values -1.5 .. 6 in steps of 0.5 -> range 7.5 over 15 levels: scale 0.5, zero point 3
    row = np.arange(-1.5, 6.01, 0.5, dtype=np.float32)[None, :]
    blocks = quantize_blocks(row, bits=4, block_size=16)
    assert blocks.scales[0, 0] == pytest.approx(0.5)
    # codes 0..15; packed two to a byte, the first in the low nibble: (0 | 1 << 4) = 16, (2 | 3 << 4) = 50, ...
    assert blocks.packed[0, 0].tolist() == [16, 50, 84, 118, 152, 186, 220, 254]
    assert blocks.zero_points[0].tolist() == [3]  # one block: its zero point in the low nibble
    np.testing.assert_allclose(dequantize_blocks(blocks), row, atol=1e-6)


def test_eight_bit_blocks_are_one_byte_per_weight_and_within_half_a_step():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    blocks = quantize_blocks(weight, bits=8, block_size=32)
    assert blocks.packed.shape == (8, 2, 32) and blocks.zero_points.shape == (8, 2)
    error = np.abs(dequantize_blocks(blocks) - weight).reshape(8, 2, 32).max(axis=-1)
    assert (error <= blocks.scales / 2 + 1e-6).all()


def test_a_q4_1_grid_comes_back_exactly_with_a_block_minimum_and_not_with_a_zero_point():
    """A block of d * q + m with q in 0..15 (what a model dequantized from llama.cpp's Q4_1 holds)."""
    rng = np.random.default_rng(2)
    d, m = 0.013, -0.0975  # m / d = -7.5: half a step from any integer zero point
    codes = rng.integers(0, 16, size=(4, 32))
    codes[:, 0], codes[:, 1] = 0, 15
    grid = (codes * d + m).astype(np.float32)
    with_minimum = quantize_blocks_with_minimum(grid, bits=4, block_size=32)
    np.testing.assert_allclose(dequantize_blocks(with_minimum), grid, atol=1e-6)
    with_zero_point = quantize_blocks(grid, bits=4, block_size=32, search_clipping=True)
    assert np.abs(dequantize_blocks(with_zero_point) - grid).max() > d / 4


def test_the_clipping_search_never_does_worse_than_rounding_over_the_range():
    rng = np.random.default_rng(3)
    weight = rng.standard_t(df=3, size=(16, 128)).astype(np.float32)  # heavy tails: clipping helps
    importance = rng.uniform(0.1, 2.0, size=128).astype(np.float32)

    def weighted_error(blocks):
        return float((((dequantize_blocks(blocks) - weight) ** 2) * importance).sum())

    plain = weighted_error(quantize_blocks(weight, 4, 32))
    searched = weighted_error(quantize_blocks(weight, 4, 32, importance=importance, search_clipping=True))
    assert searched < plain


@pytest.mark.parametrize("bits", [4, 8])
def test_onnxruntime_matmulnbits_multiplies_by_the_weight_we_dequantize(bits):
    """ONNX Runtime's MatMulNBits (accuracy level 0: float compute) against x @ W^T in numpy."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits)
    n, k = 48, 96
    weight = rng.standard_normal((n, k)).astype(np.float32)
    blocks = quantize_blocks(weight, bits, 32)
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=32, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
                              [numpy_helper.from_array(blocks.packed, "b"), numpy_helper.from_array(blocks.scales, "s"),
                               numpy_helper.from_array(blocks.zero_points, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, k)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ dequantize_blocks(blocks).T, rtol=1e-4, atol=1e-4)
