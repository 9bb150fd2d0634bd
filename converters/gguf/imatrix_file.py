"""llama.cpp's GGUF imatrix format, written and read with gguf-py: general.type = imatrix, imatrix.datasets,
imatrix.chunk_count and imatrix.chunk_size, and per weight tensor two F32 tensors, `<name>.in_sum2` (ggml shape
[columns, 1]: the sums of squares) and `<name>.counts` (ggml shape [1, 1]: the rows). llama-quantize --imatrix
and llama-imatrix --in-file read it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from converters.gguf.imatrix import ColumnStats, ImportanceMatrix
from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import atomic_output_file
from edgepack.core.gguf_file import metadata_value, open_reader

SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"


def write_imatrix(matrix: ImportanceMatrix, path: Path, architecture: str) -> None:
    """Write `matrix` to `path` (atomically); `architecture` is the model's GGUF architecture, for the record."""
    with atomic_output_file(Path(path)) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, list(matrix.datasets))
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, matrix.windows)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, matrix.window)
        for name in sorted(matrix.tensors):  # a fixed order, as llama-imatrix writes
            stats = matrix.tensors[name]
            writer.add_tensor(name + SUMS_SUFFIX, stats.sum_of_squares.astype(np.float32).reshape(1, -1))
            writer.add_tensor(name + COUNTS_SUFFIX, np.array([[stats.rows]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def read_imatrix(path: Path) -> ImportanceMatrix:
    reader = open_reader(path)
    if metadata_value(reader, gguf.Keys.General.TYPE) != gguf.GGUFType.IMATRIX:
        raise EdgepackError(f"{path} is not an importance matrix: its general.type is "
                            f"{metadata_value(reader, gguf.Keys.General.TYPE)!r}, expected 'imatrix'")
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    tensors: dict[str, ColumnStats] = {}
    for sums_name in sorted(name for name in by_name if name.endswith(SUMS_SUFFIX)):
        name = sums_name[:-len(SUMS_SUFFIX)]
        sums, counts = by_name[sums_name], by_name.get(name + COUNTS_SUFFIX)
        if counts is None:
            raise EdgepackError(f"{path}: {sums_name} has no {name}{COUNTS_SUFFIX} beside it")
        if {sums.tensor_type, counts.tensor_type} != {gguf.GGMLQuantizationType.F32}:
            raise EdgepackError(f"{path}: {name}'s sums and counts must be F32")
        if int(counts.n_elements) != 1:
            raise EdgepackError(f"{path}: {name} has {int(counts.n_elements)} counts (one per expert); mixtures "
                                "of experts are not supported, a dense tensor has one count")
        tensors[name] = ColumnStats(np.asarray(sums.data, dtype=np.float64).reshape(-1),
                                    int(round(float(np.asarray(counts.data).reshape(-1)[0]))))
    if not tensors:
        raise EdgepackError(f"{path} holds no <tensor>{SUMS_SUFFIX} entries")
    return ImportanceMatrix(tensors=tensors,
                            window=int(metadata_value(reader, gguf.Keys.IMatrix.CHUNK_SIZE, 0)),
                            windows=int(metadata_value(reader, gguf.Keys.IMatrix.CHUNK_COUNT, 0)),
                            datasets=tuple(metadata_value(reader, gguf.Keys.IMatrix.DATASETS, ())))
