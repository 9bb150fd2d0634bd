"""What a model directory, a GGUF file or an ONNX variant folder holds, for `edgepack inspect`."""

from __future__ import annotations

from pathlib import Path

from edgepack.core.artifacts import StudentModel, to_json_dict
from edgepack.core.gguf_file import GGUFSummary, inspect_gguf
from edgepack.core.onnx_folder import OnnxSummary, inspect_onnx_folder, is_onnx_folder
from edgepack.student.load import load_student


def inspect_path(path: Path) -> StudentModel | GGUFSummary | OnnxSummary:
    if Path(path).is_file():
        return inspect_gguf(path)
    if is_onnx_folder(path):
        return inspect_onnx_folder(path)
    return load_student(path)


def summary_rows(summary: StudentModel | GGUFSummary | OnnxSummary) -> list[tuple[str, str]]:
    data = to_json_dict(summary)
    rows = []
    for key, value in data.items():
        if key == "quant_types":
            value = ", ".join(f"{name} {share:.1%}" for name, share in value.items())
        elif key == "parameter_count":
            value = f"{value:,}"
        rows.append((key.replace("_", " "), str(value)))
    return rows
