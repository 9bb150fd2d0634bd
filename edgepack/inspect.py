"""What a model directory or a GGUF file holds, for `edgepack inspect`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from converters.gguf_files import metadata_value, open_reader
from edgepack.artifacts import StudentModel, to_json_dict
from edgepack.student import load_student


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


def inspect_path(path: Path) -> StudentModel | GGUFSummary:
    if Path(path).is_file():
        return inspect_gguf(path)
    return load_student(path)


def summary_rows(summary: StudentModel | GGUFSummary) -> list[tuple[str, str]]:
    data = to_json_dict(summary)
    rows = []
    for key, value in data.items():
        if key == "quant_types":
            value = ", ".join(f"{name} {share:.1%}" for name, share in value.items())
        elif key == "parameter_count":
            value = f"{value:,}"
        rows.append((key.replace("_", " "), str(value)))
    return rows
