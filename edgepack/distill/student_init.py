"""The student's starting point: an existing Hugging Face model, or the teacher with layers dropped.

Dropping layers keeps width and tokenizer: the kept layers are spread evenly over the teacher's depth, first and
last always kept (the initialisation of DistilBERT, and of Minitron's depth pruning). Token-level distillation
needs the student to read and write the teacher's vocabulary, so `check_same_vocabulary` refuses a student whose
tokenizer differs, naming the first tokens that differ.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgepack.core.errors import EdgepackError

# files beside the weights that a Hugging Face folder's tokenizer and generation settings live in
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
PER_LAYER_CONFIG_LISTS = ("layer_types",)  # config entries with one value per layer (sliding or full attention)


def kept_layers(total: int, keep: str | int | float) -> list[int]:
    """Indices of the layers to keep: `keep` is a count ("15") or a share of the layers ("0.5")."""
    count = _layer_count(total, keep)
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def _layer_count(total: int, keep: str | int | float) -> int:
    text = str(keep).strip()
    try:
        value = float(text)
    except ValueError as exc:
        raise EdgepackError(f"--keep-layers {keep!r}: give a number of layers (e.g. 12) or a share (e.g. 0.5)") \
            from exc
    count = round(value * total) if ("." in text or value < 1) else int(value)
    if value <= 0 or count < 1:
        raise EdgepackError(f"--keep-layers {keep!r} keeps no layer of the teacher's {total}")
    if count > total:
        raise EdgepackError(f"--keep-layers {keep!r}: the teacher has only {total} layers")
    return count


def decoder_layers(model):
    """The model's list of decoder layers (model.model.layers for the architectures transformers ships)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise EdgepackError(f"cannot find the decoder layers of {type(model).__name__}: dropping layers needs a "
                            "model whose layers sit at model.layers (Llama, Qwen, Gemma, Phi-3, Mistral ...)")
    return inner, layers


def student_from_teacher(teacher_dir: Path, keep: str | int | float, out_dir: Path) -> list[int]:
    """Write a student made of the teacher's kept layers (float32) to `out_dir`; returns the kept indices."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    inner, layers = decoder_layers(model)
    keep_indices = kept_layers(len(layers), keep)
    inner.layers = torch.nn.ModuleList([layers[i] for i in keep_indices])
    for new_index, layer in enumerate(inner.layers):  # the KV cache is addressed by each attention's layer_idx
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(keep_indices)
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, name, [values[i] for i in keep_indices])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer_files(teacher_dir, out_dir)
    return keep_indices


def copy_tokenizer_files(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher_name: str, student_name: str) -> None:
    """Refuse token-level distillation between tokenizers that differ (size, token strings or ids)."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    teacher_by_id = {i: t for t, i in teacher_vocab.items()}
    student_by_id = {i: t for t, i in student_vocab.items()}
    differing = [i for i in sorted(set(teacher_by_id) | set(student_by_id))
                 if teacher_by_id.get(i) != student_by_id.get(i)]
    if not differing:
        return
    shown = ", ".join(f"id {i}: teacher {teacher_by_id.get(i)!r} vs student {student_by_id.get(i)!r}"
                      for i in differing[:3])
    raise EdgepackError(
        f"the student {student_name} and the teacher {teacher_name} have different vocabularies "
        f"({len(student_vocab)} vs {len(teacher_vocab)} tokens, {len(differing)} ids differ; first: {shown}). "
        "Logit distillation compares distributions token by token and needs the same tokenizer: use --mode "
        "sequence (trains on the teacher's answers as text), or a student with the teacher's tokenizer "
        "(--from-teacher --keep-layers)")
