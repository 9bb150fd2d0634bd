"""ONNX FP32 -> INT8 (onnxruntime's dynamic quantization) and -> INT4 (its weight-only MatMulNBits quantizer)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgepack.core.cpu import INT8_ISAS
from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import atomic_output_dir, refuse_existing
from edgepack.core.onnx_folder import MODEL_FILE

TWO_GB = 2 << 30


@dataclass(frozen=True)
class Int8Setting:
    """onnxruntime's dynamic-quantization knobs that depend on the integer matmul kernels of the target."""

    per_channel: bool
    reduce_range: bool
    why: str


# Weights are signed int8, activations uint8 (u8s8), per output channel. On AVX2 and AVX-512 without VNNI
# the u8s8 multiply-add (vpmaddubsw) can saturate int16, so weights keep 7 bits (reduce_range); VNNI and
# ARM64's dot-product instructions accumulate in int32 and take the full 8 bits.
INT8_SETTINGS: dict[str, Int8Setting] = {
    "avx2": Int8Setting(per_channel=True, reduce_range=True, why="u8s8 on AVX2 saturates int16: 7-bit weights"),
    "avx512-vnni": Int8Setting(per_channel=True, reduce_range=False, why="VNNI accumulates in int32: 8-bit weights"),
    "arm64": Int8Setting(per_channel=True, reduce_range=False, why="ARM64 dot products accumulate in int32"),
}


def untie_transposed_weights(model) -> int:
    """Give every MatMul whose weight is Transpose(initializer) its own transposed initializer.

    Tied embeddings export as Gather(embedding) for the input and MatMul(x, Transpose(embedding)) for the output
    head. The quantizers only quantize constant weights, so the head (often a fifth of the model) would stay
    FP32 and, worse, a quantized shared table would be dequantized whole on every step. Returns how many were
    untied."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    untied = 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        source = numpy_helper.to_array(initializers[transpose.input[0]])
        if source.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{transpose.input[0]}.transposed_for_{node.name or 'matmul'}".replace("/", "_")
        graph.initializer.append(numpy_helper.from_array(source.T.copy(), name))
        node.input[1] = name
        untied += 1
    still_used = {name for node in graph.node for name in node.input}
    for node in list(graph.node):
        if node.op_type == "Transpose" and not any(out in still_used for out in node.output):
            graph.node.remove(node)
    return untied


def activation_outlier_matmuls(model) -> list[str]:
    """The feed-forward down projections: their input (the gated FFN activation) carries a few channels far
    larger than the rest, and dynamic quantization gives a whole activation tensor one uint8 scale. Quantizing
    them raised the demo student's mean KL divergence from 0.06 to 0.44, so they stay FP32 in onnx-int8."""
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and "down_proj" in node.name]


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, tokenizer and generation files travel with the model."""
    for path in src.iterdir():
        if path.is_file() and not path.name.startswith(MODEL_FILE):
            shutil.copy2(path, dst / path.name)


def _model_bytes(src: Path) -> int:
    return sum(path.stat().st_size for path in src.iterdir() if path.name.startswith(MODEL_FILE))


def quantize_int8(src: Path, dst: Path, isa: str, *, force: bool = False) -> Int8Setting:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if isa not in INT8_SETTINGS:
        raise EdgepackError(f"unknown int8 target {isa!r}; accepted: {', '.join(INT8_ISAS)}")
    setting = INT8_SETTINGS[isa]
    refuse_existing(dst, force)
    logging.getLogger("root").setLevel(logging.ERROR)
    with atomic_output_dir(dst) as tmp:
        model = onnx.load(str(src / MODEL_FILE))
        untie_transposed_weights(model)
        quantize_dynamic(model, tmp / MODEL_FILE, weight_type=QuantType.QInt8,
                         per_channel=setting.per_channel, reduce_range=setting.reduce_range,
                         op_types_to_quantize=["MatMul", "Gather"],
                         nodes_to_exclude=activation_outlier_matmuls(model),
                         use_external_data_format=_model_bytes(src) > TWO_GB)
        _copy_side_files(src, tmp)
    return setting


def quantize_int4(src: Path, dst: Path, *, block_size: int = 32, force: bool = False) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise EdgepackError(f"int4 block size must be a power of two >= 16, got {block_size}")
    refuse_existing(dst, force)
    with atomic_output_dir(dst) as tmp:
        model = onnx.load(str(src / MODEL_FILE))
        untie_transposed_weights(model)
        # accuracy_level 4: activations in int8 for the matmul, the fast CPU path for 4-bit weights
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                         accuracy_level=4, op_types_to_quantize=("MatMul",))
        quantizer.process()
        quantizer.model.save_model_to_file(str(tmp / MODEL_FILE),
                                           use_external_data_format=_model_bytes(src) > TWO_GB)
        _copy_side_files(src, tmp)
