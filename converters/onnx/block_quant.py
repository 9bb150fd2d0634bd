"""Block-wise weight quantization in ONNX Runtime's MatMulNBits layout (also GatherBlockQuantized's, for a table
gathered by rows).

A weight W of shape (N outputs, K inputs) is cut along K into blocks of `block_size`; each block gets a float
scale and an integer zero point, and its values become q = clamp(round(w / scale) + zero_point, 0, 2^bits - 1),
so that w ~ (q - zero_point) * scale. Packed, as the operator reads them: B is uint8 (N, blocks, block_size *
bits / 8), low-order bits first; scales (N, blocks); zero points uint8, packed the same way along the blocks.

Rounding to nearest over each block's min..max range is the plain way. `search_clipping` instead tries
narrower ranges and keeps, per block, the one with the least squared error, weighted per input column by
`importance` (the mean square of that column's activations on a calibration text, as llama.cpp's importance
matrix weighs its K-quants): an outlier weight may be clipped when the columns it multiplies are quiet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHRINK_GRID = tuple(1.0 - 0.04 * step for step in range(13))  # range scaled by 1.00, 0.96, ... 0.52


@dataclass(frozen=True)
class BlockQuantized:
    packed: np.ndarray  # uint8 (N, blocks, block_size * bits // 8)
    scales: np.ndarray  # float32 (N, blocks)
    zero_points: np.ndarray  # uint8 (N, ceil(blocks * bits / 8))
    bits: int
    block_size: int
    columns: int  # K before padding to whole blocks
    # float32 (N, blocks) or None: w ~ q * scale + minimum, zero points all 0. MatMulNBits takes only integer zero
    # points at speed, so the graph adds (sum of each block of x) @ minimum^T with a small MatMul of its own
    minimums: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        extra = self.minimums.nbytes if self.minimums is not None else 0
        return self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes + extra


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values < 2^bits, packed along the last axis, low-order bits first."""
    if bits == 8:
        return values.astype(np.uint8)
    per_byte = 8 // bits
    if values.shape[-1] % per_byte:
        pad = per_byte - values.shape[-1] % per_byte
        values = np.concatenate([values, np.zeros((*values.shape[:-1], pad), values.dtype)], axis=-1)
    grouped = values.reshape(*values.shape[:-1], -1, per_byte).astype(np.uint8)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for slot in range(per_byte):
        packed |= grouped[..., slot] << (bits * slot)
    return packed


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count]
    per_byte, mask = 8 // bits, (1 << bits) - 1
    slots = [(packed >> (bits * slot)) & mask for slot in range(per_byte)]
    return np.stack(slots, axis=-1).reshape(*packed.shape[:-1], -1)[..., :count]


def _quantize_with_range(blocks: np.ndarray, low: np.ndarray, high: np.ndarray, levels: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, scale and zero point for each block's [low, high] (low <= 0 <= high, so zero is exact)."""
    scale = (high - low) / levels
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.round(-low / scale), 0, levels)
    codes = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, levels)
    return codes, scale, zero


def _split_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, int]:
    """(N, blocks, block_size) float32, the last block zero-padded, and K before padding."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 16, got {block_size}")
    weight = np.asarray(weight, dtype=np.float32)
    rows, columns = weight.shape
    blocks_per_row = -(-columns // block_size)
    padded = np.zeros((rows, blocks_per_row * block_size), dtype=np.float32)
    padded[:, :columns] = weight
    return padded.reshape(rows, blocks_per_row, block_size), columns


def _column_weights(importance: np.ndarray | None, columns: int, blocks: np.ndarray) -> np.ndarray:
    """Each column's weight in the rounding error, shaped (blocks, block_size): the importance (ones without
    one), zero for the padding."""
    _, blocks_per_row, block_size = blocks.shape
    weights = np.ones(blocks_per_row * block_size, dtype=np.float32)
    if importance is not None:
        weights[:columns] = np.maximum(np.asarray(importance, dtype=np.float32), 1e-12)
    weights[columns:] = 0.0
    return weights.reshape(blocks_per_row, block_size)


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int, *, importance: np.ndarray | None = None,
                    search_clipping: bool = False) -> BlockQuantized:
    """`weight` (N, K) float -> MatMulNBits blocks. `importance` (K,) weighs the clipping search's error."""
    blocks, columns = _split_blocks(weight, bits, block_size)
    levels = (1 << bits) - 1
    low = np.minimum(blocks.min(axis=-1), 0.0)
    high = np.maximum(blocks.max(axis=-1), 0.0)
    codes, scale, zero = _quantize_with_range(blocks, low, high, levels)
    if search_clipping:
        weights = _column_weights(importance, columns, blocks)
        best_error = _weighted_error(blocks, codes, scale, zero, weights)
        for shrink in SHRINK_GRID[1:]:
            trial = _quantize_with_range(blocks, low * shrink, high * shrink, levels)
            error = _weighted_error(blocks, *trial, weights)
            better = error < best_error
            codes = np.where(better[..., None], trial[0], codes)
            scale = np.where(better, trial[1], scale)
            zero = np.where(better, trial[2], zero)
            best_error = np.minimum(error, best_error)
        codes, scale, zero = _refine(blocks, codes, scale, zero, weights, levels)
    return BlockQuantized(packed=_pack(codes.astype(np.uint8), bits), scales=scale.astype(np.float32),
                          zero_points=_pack(zero.astype(np.uint8), bits), bits=bits, block_size=block_size,
                          columns=columns)


def _refine(blocks, codes, scale, zero, weights, levels, rounds: int = 3):
    """Each block's zero point moved by -1, 0 or +1, and for each, the scale that minimises the weighted error for
    the current codes (a closed-form least squares) with the codes rounded again to it, a few rounds; a block
    keeps whichever of these had the least error."""
    best_error = _weighted_error(blocks, codes, scale, zero, weights)
    for shift in (0, -1, 1):
        trial_zero = np.clip(zero + shift, 0, levels)
        trial_scale, trial_codes = scale, np.clip(np.round(blocks / scale[..., None]) + trial_zero[..., None], 0,
                                                  levels)
        for _ in range(rounds):
            centred = trial_codes - trial_zero[..., None]
            denominator = (weights * centred * centred).sum(axis=-1)
            fitted = (weights * centred * blocks).sum(axis=-1) / np.maximum(denominator, 1e-30)
            trial_scale = np.where((denominator > 0) & (fitted > 0), fitted, trial_scale).astype(np.float32)
            trial_codes = np.clip(np.round(blocks / trial_scale[..., None]) + trial_zero[..., None], 0, levels)
            error = _weighted_error(blocks, trial_codes, trial_scale, trial_zero, weights)
            better = error < best_error
            codes = np.where(better[..., None], trial_codes, codes)
            scale = np.where(better, trial_scale, scale)
            zero = np.where(better, trial_zero, zero)
            best_error = np.minimum(error, best_error)
    return codes, scale, zero


def _weighted_error(blocks, codes, scale, zero, weights) -> np.ndarray:
    restored = (codes - zero[..., None]) * scale[..., None]
    return ((restored - blocks) ** 2 * weights).sum(axis=-1)


def quantize_blocks_with_minimum(weight: np.ndarray, bits: int, block_size: int, *,
                                 importance: np.ndarray | None = None, search: bool = True) -> BlockQuantized:
    """Blocks with a float minimum instead of an integer zero point (llama.cpp's Q4_1 and Q4_K's form): codes
    0..2^bits-1, w ~ q * scale + minimum. A weight already on such a grid (a model dequantized from Q4_1) comes
    back exactly; otherwise the range is searched and (scale, minimum) refitted by weighted least squares."""
    blocks, columns = _split_blocks(weight, bits, block_size)
    levels = (1 << bits) - 1
    weights = _column_weights(importance, columns, blocks)
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)

    def encode(scale, minimum):
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        codes = np.clip(np.round((blocks - minimum[..., None]) / safe[..., None]), 0, levels)
        error = ((codes * safe[..., None] + minimum[..., None] - blocks) ** 2 * weights).sum(axis=-1)
        return codes, safe, minimum, error

    codes, scale, minimum, best = encode((high - low) / levels, low)
    for shrink in (SHRINK_GRID[1:] if search else ()):
        middle = (high + low) / 2
        trial = encode((high - low) * shrink / levels, middle - (middle - low) * shrink)
        better = trial[3] < best
        codes = np.where(better[..., None], trial[0], codes)
        scale, minimum = np.where(better, trial[1], scale), np.where(better, trial[2], minimum)
        best = np.minimum(trial[3], best)
    for _ in range(3 if search else 0):  # weighted least squares for (scale, minimum) given the codes
        sw, sq, sqq = weights.sum(-1), (weights * codes).sum(-1), (weights * codes * codes).sum(-1)
        sx, sqx = (weights * blocks).sum(-1), (weights * codes * blocks).sum(-1)
        det = sw * sqq - sq * sq
        ok = det > 1e-20
        fitted_scale = np.where(ok, (sw * sqx - sq * sx) / np.where(ok, det, 1.0), scale)
        fitted_min = np.where(ok, (sqq * sx - sq * sqx) / np.where(ok, det, 1.0), minimum)
        trial = encode(np.where(fitted_scale > 0, fitted_scale, scale).astype(np.float32),
                       fitted_min.astype(np.float32))
        better = trial[3] < best
        codes = np.where(better[..., None], trial[0], codes)
        scale, minimum = np.where(better, trial[1], scale), np.where(better, trial[2], minimum)
        best = np.minimum(trial[3], best)
    return BlockQuantized(packed=_pack(codes.astype(np.uint8), bits), scales=scale.astype(np.float32),
                          zero_points=_pack(np.zeros(scale.shape, dtype=np.uint8), bits), bits=bits,
                          block_size=block_size, columns=columns, minimums=minimum.astype(np.float32))


def dequantize_blocks(quantized: BlockQuantized) -> np.ndarray:
    """The (N, K) float32 weight that the graph multiplies by."""
    rows, blocks_per_row = quantized.scales.shape
    codes = _unpack(quantized.packed, quantized.bits, quantized.block_size).astype(np.float32)
    zero = _unpack(quantized.zero_points, quantized.bits, blocks_per_row).astype(np.float32)
    restored = (codes - zero[..., None]) * quantized.scales[..., None]
    if quantized.minimums is not None:
        restored = restored + quantized.minimums[..., None]
    return restored.reshape(rows, -1)[:, :quantized.columns]
