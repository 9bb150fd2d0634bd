"""Compute an importance matrix from the Hugging Face model itself, in torch: a forward pre-hook on every linear
layer of the transformer blocks adds up the squares of its input's columns while the model reads a calibration
text, window by window.

Each linear layer is one GGUF tensor of our converter (q/k/v/o, gate/up/down, and Phi-3's fused qkv and gate_up,
which HF already stores fused), named as the converter names its weight. Rope's q/k row permutation reorders
output rows, never input columns, so the sums need no permutation. As llama.cpp's llama-imatrix does by default,
only the blocks' tensors are collected: not the output projection (lm_head, or the tied token embedding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import gguf
import numpy as np
import torch

from converters.architectures import architecture_for_config
from converters.gguf.from_hf import gguf_tensor_name
from converters.gguf.hparams import read_hparams
from converters.gguf.imatrix import ColumnStats, ImportanceMatrix
from converters.hf_model import HFModelDir
from edgepack.core.errors import EdgepackError
from runtimes.torch_reference import load_reference

CALIBRATION_WINDOW = 512  # tokens per forward pass: llama-imatrix's default context
BLOCK_PREFIX = "blk."


class _Accumulator:
    """The running sum of squares of one linear layer's input columns, and the rows seen."""

    def __init__(self, columns: int) -> None:
        self.sum_of_squares = torch.zeros(columns, dtype=torch.float64)
        self.rows = 0

    def __call__(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        rows = inputs[0].detach().reshape(-1, self.sum_of_squares.shape[0]).to(torch.float64)
        self.sum_of_squares += rows.square().sum(dim=0)
        self.rows += rows.shape[0]


def block_linear_layers(model: torch.nn.Module, source: HFModelDir) -> dict[str, torch.nn.Linear]:
    """The transformer blocks' linear layers, by the GGUF name our converter gives their weight."""
    arch = architecture_for_config(source.config)
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, read_hparams(source.config).num_layers)
    layers: dict[str, torch.nn.Linear] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        gguf_name = gguf_tensor_name(f"{module_name}.weight", arch, name_map)
        if gguf_name is not None and gguf_name.startswith(BLOCK_PREFIX):
            layers[gguf_name] = module
    if not layers:
        raise EdgepackError(f"{source.path}: found no linear layers in the transformer blocks to compute an "
                            "importance matrix for")
    return layers


def calibration_windows(tokenizer, text: str, window: int) -> list[list[int]]:
    """`text` cut into windows of at most `window` tokens, each starting like a fresh text (BOS if the tokenizer
    adds one), the last one possibly shorter."""
    start = tokenizer("", add_special_tokens=True)["input_ids"]
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = window - len(start)
    return [start + body[i:i + step] for i in range(0, len(body), step)]


@contextmanager
def _hooked(layers: dict[str, torch.nn.Linear]) -> Iterator[dict[str, _Accumulator]]:
    accumulators = {name: _Accumulator(layer.in_features) for name, layer in layers.items()}
    handles = [layer.register_forward_pre_hook(accumulators[name]) for name, layer in layers.items()]
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()


def compute_imatrix(source: HFModelDir, text: str, dataset: str, window: int = CALIBRATION_WINDOW
                    ) -> ImportanceMatrix:
    """The importance matrix of the model in `source` (float32, transformers) over `text`; `dataset` says what
    the text is, for the record."""
    model, tokenizer = load_reference(source.path)
    window = min(window, int(getattr(model.config, "max_position_embeddings", window)))
    windows = calibration_windows(tokenizer, text, window)
    if not windows:
        raise EdgepackError("the calibration text has no tokens; expected a few thousand words of text")
    with _hooked(block_linear_layers(model, source)) as accumulators, torch.inference_mode():
        for ids in windows:
            model(torch.tensor([ids]), use_cache=False)
    tensors = {name: ColumnStats(acc.sum_of_squares.numpy(), acc.rows) for name, acc in sorted(accumulators.items())}
    return ImportanceMatrix(tensors=tensors, window=window, windows=len(windows), datasets=(dataset,))


def compute_column_importance(source: HFModelDir, text: str, window: int = CALIBRATION_WINDOW
                              ) -> dict[str, np.ndarray]:
    """Per linear layer of the model in `source`, by its Hugging Face module name (lm_head included), the mean
    square of each input column over `text`: how much each column's rounding error weighs in ONNX's block
    quantization, as llama.cpp's importance matrix weighs its K-quants."""
    model, tokenizer = load_reference(source.path)
    window = min(window, int(getattr(model.config, "max_position_embeddings", window)))
    windows = calibration_windows(tokenizer, text, window)
    if not windows:
        raise EdgepackError("the calibration text has no tokens; expected a few thousand words of text")
    layers = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    with _hooked(layers) as accumulators, torch.inference_mode():
        for ids in windows:
            model(torch.tensor([ids]), use_cache=False)
    return {name: (acc.sum_of_squares / max(acc.rows, 1)).numpy().astype(np.float32)
            for name, acc in accumulators.items()}
