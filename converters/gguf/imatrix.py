"""An importance matrix: per weight tensor, the sum over every activation row its matrix multiplication saw of
each input column's square, and how many rows that was. llama.cpp's quantizer weights each column's rounding
error by in_sum2 / rows, so the columns that carry large activations are kept most exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ColumnStats:
    """What one weight tensor's inputs looked like."""

    sum_of_squares: np.ndarray  # per input column (the GGUF tensor's ne[0]), float64
    rows: int  # activation rows (tokens) that went through the tensor


@dataclass(frozen=True)
class ImportanceMatrix:
    tensors: dict[str, ColumnStats]  # by the GGUF tensor name, e.g. blk.0.attn_q.weight
    window: int  # tokens per forward pass (llama.cpp calls it the chunk size)
    windows: int  # forward passes run (llama.cpp's chunk count)
    datasets: tuple[str, ...]  # what the text was, for the record

    @property
    def tokens(self) -> int:
        return max((stats.rows for stats in self.tensors.values()), default=0)

    def importances(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer takes per tensor: in_sum2 / rows per column, as llama-quantize derives it
        from an imatrix file (all ones for a tensor that saw no rows)."""
        return {name: (stats.sum_of_squares / stats.rows if stats.rows > 0
                       else np.ones_like(stats.sum_of_squares)).astype(np.float32)
                for name, stats in self.tensors.items()}

    def describe(self) -> str:
        return (f"{len(self.tensors)} tensors over {self.tokens} tokens ({self.windows} windows of at most "
                f"{self.window}) of {', '.join(self.datasets)}")
