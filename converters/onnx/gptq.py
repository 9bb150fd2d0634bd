"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a weight one input column at a time, and spread each column's rounding error over the
columns not yet quantized, in proportion to how the calibration activations correlate them (the inverse of the
Hessian H = X^T X of the layer's inputs). Blocks of 32 along the input get their scale and zero point when the
first of their columns is reached, from the weights as updated so far, chosen by block_quant's weighted search.

Written from the paper's algorithm (lazy batch updates over 128 columns, a Cholesky factor of H^-1, 1% dampening).
"""

from __future__ import annotations

import numpy as np
import torch

from converters.onnx.block_quant import BlockQuantized, _pack, quantize_blocks

DAMPENING = 0.01  # of the mean diagonal of H, added to it (the paper's default)
LAZY_BATCH = 128  # columns whose updates are applied together


def gptq_quantize(weight: np.ndarray, gram: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    """`weight` (N, K) float, `gram` (K, K) = sum of x x^T over the calibration inputs of this layer."""
    W = torch.tensor(weight, dtype=torch.float32).clone()
    rows, columns = W.shape
    if columns % block_size:
        return quantize_blocks(weight, bits, block_size, importance=np.diag(gram), search_clipping=True)
    H = torch.tensor(gram, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(columns, dtype=torch.float64) * DAMPENING * torch.mean(torch.diag(H))
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:  # H not positive definite even damped: no error feedback for this layer
        return quantize_blocks(weight, bits, block_size, importance=np.diag(gram), search_clipping=True)
    Hinv = upper.float()
    levels = (1 << bits) - 1
    blocks = columns // block_size
    codes = torch.zeros((rows, columns), dtype=torch.float32)
    scales = np.zeros((rows, blocks), dtype=np.float32)
    zeros = np.zeros((rows, blocks), dtype=np.float32)
    diagonal = np.diag(gram).astype(np.float32)
    scale_t = zero_t = None
    batch = max(LAZY_BATCH, block_size)  # a block's columns are never split between two batches
    for start in range(0, columns, batch):
        stop = min(start + batch, columns)
        W1 = W[:, start:stop].clone()
        errors = torch.zeros_like(W1)
        H1 = Hinv[start:stop, start:stop]
        for offset in range(stop - start):
            column = start + offset
            if column % block_size == 0:  # this block's scale and zero point, from the weights as updated
                block = column // block_size
                width = block_size
                current = W1[:, offset:offset + width].numpy()
                chosen = quantize_blocks(current, bits, block_size, importance=diagonal[column:column + width],
                                         search_clipping=True)
                scales[:, block] = chosen.scales[:, 0]
                zeros[:, block] = _zero_points(chosen)[:, 0]
                scale_t, zero_t = torch.from_numpy(scales[:, block].copy()), torch.from_numpy(zeros[:, block].copy())
            w = W1[:, offset]
            q = torch.clamp(torch.round(w / scale_t) + zero_t, 0, levels)
            codes[:, column] = q
            restored = (q - zero_t) * scale_t
            error = (w - restored) / H1[offset, offset]
            W1[:, offset:] -= error.unsqueeze(1) @ H1[offset, offset:].unsqueeze(0)
            errors[:, offset] = error
        W[:, stop:] -= errors @ Hinv[start:stop, stop:]
    packed_codes = codes.numpy().astype(np.uint8).reshape(rows, blocks, block_size)
    return BlockQuantized(packed=_pack(packed_codes, bits), scales=scales, zero_points=_pack(zeros.astype(np.uint8),
                                                                                             bits),
                          bits=bits, block_size=block_size, columns=columns)


def _zero_points(quantized: BlockQuantized) -> np.ndarray:
    from converters.onnx.block_quant import _unpack

    return _unpack(quantized.zero_points, quantized.bits, quantized.scales.shape[1]).astype(np.float32)
