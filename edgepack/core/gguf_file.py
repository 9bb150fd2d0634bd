"""Reading GGUF files with gguf-py: metadata as plain values, a summary of what a file holds, and copying a file
with extra metadata. The converters and the llama.cpp engine both read GGUF through this module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgepack.core.errors import EdgepackError

_SKIPPED_ON_COPY = ("GGUF.", gguf.Keys.General.ARCHITECTURE)


def open_reader(path: Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise EdgepackError(f"{path} does not exist; expected a .gguf file")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError/struct errors on bad files
        raise EdgepackError(f"{path} is not a readable GGUF file (truncated or corrupt?): {exc}") from exc


def metadata_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        return default
    return field.contents()


def copy_with_metadata(src: Path, dst: Path, extra: dict[str, str]) -> None:
    """Write `dst` with `src`'s metadata and tensors (bytes unchanged), plus the string keys in `extra`."""
    reader = open_reader(src)
    writer = gguf.GGUFWriter(dst, str(metadata_value(reader, gguf.Keys.General.ARCHITECTURE)))
    for key, field in reader.fields.items():
        if key.startswith(_SKIPPED_ON_COPY) or key in extra:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for key, value in extra.items():
        writer.add_string(key, value)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, int(tensor.n_bytes),
                               raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(np.asarray(tensor.data))
    writer.close()


@dataclass(frozen=True)
class GGUFSummary:
    path: Path
    architecture: str
    parameter_count: int
    context_length: int | None
    tokenizer_kind: str  # "bpe", "spm" or the GGUF tokenizer model name
    has_chat_template: bool
    bytes: int
    quant_types: dict[str, float]  # type name -> share of tensor bytes
    converter: str | None
    quantizer: str | None


def inspect_gguf(path: Path) -> GGUFSummary:
    reader = open_reader(path)
    arch = str(metadata_value(reader, "general.architecture", "unknown"))
    by_type: dict[str, int] = {}
    for tensor in reader.tensors:
        by_type[tensor.tensor_type.name] = by_type.get(tensor.tensor_type.name, 0) + int(tensor.n_bytes)
    total = sum(by_type.values()) or 1
    tokenizer_model = str(metadata_value(reader, "tokenizer.ggml.model", "none"))
    return GGUFSummary(
        path=Path(path),
        architecture=arch,
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        context_length=metadata_value(reader, f"{arch}.context_length"),
        tokenizer_kind={"gpt2": "bpe", "llama": "spm"}.get(tokenizer_model, tokenizer_model),
        has_chat_template=metadata_value(reader, "tokenizer.chat_template") is not None,
        bytes=Path(path).stat().st_size,
        quant_types={name: round(size / total, 4) for name, size in sorted(by_type.items(), key=lambda kv: -kv[1])},
        converter=metadata_value(reader, "edgepack.converter"),
        quantizer=metadata_value(reader, "edgepack.quantizer"),
    )
