"""Describe a Hugging Face model directory as a StudentModel (what the converters will see)."""

from __future__ import annotations

import json
from pathlib import Path

from converters.architectures import architecture_for_config
from converters.gguf.hparams import read_hparams
from converters.gguf.to_hf import ORIGIN_FILE
from converters.gguf.vocab import tokenizer_kind
from converters.hf_model import HFModelDir
from edgepack.core.artifacts import StudentModel


def load_student(path: Path, allow_pickle: bool = False) -> StudentModel:
    model = HFModelDir(path, allow_pickle=allow_pickle)
    arch = architecture_for_config(model.config)
    hp = read_hparams(model.config)
    return StudentModel(
        path=model.path,
        architecture=arch.name,
        hf_model_type=str(model.config.get("model_type")),
        parameter_count=model.parameter_count,
        context_length=hp.context_length,
        tokenizer_kind=tokenizer_kind(model),
        has_chat_template=bool(model.chat_template),
        dtype=model.stored_dtype,
        origin=_origin_note(model.path),
        distillation=distillation_summary(model.path),
    )


DISTILL_RECORD = "distill.json"  # written by `edgepack distill` beside the student's weights


def distillation_summary(path: Path) -> dict | None:
    """What `edgepack distill` recorded about how this student was made (teacher, settings, before/after
    metrics), without the per-step history; None for a model that was not made by it."""
    try:
        record = json.loads((Path(path) / DISTILL_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    return {key: value for key, value in record.items() if key not in ("losses", "evaluations")}


def _origin_note(path: Path) -> str | None:
    try:
        return str(json.loads((path / ORIGIN_FILE).read_text())["note"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
