"""What a model directory or a GGUF file holds, for `edgepack inspect`."""

from __future__ import annotations

from pathlib import Path

from edgepack.core.artifacts import StudentModel, to_json_dict
from edgepack.core.gguf_file import GGUFSummary, inspect_gguf
from edgepack.student.load import load_student


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
