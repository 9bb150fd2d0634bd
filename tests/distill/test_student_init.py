"""The student made from the teacher by dropping layers, and the vocabulary check of token-level distillation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from synth_models import TINY_MODELS, build_bpe_tokenizer

from edgepack.core.errors import EdgepackError
from edgepack.distill.student_init import check_same_vocabulary, kept_layers, student_from_teacher
from edgepack.student.tiny import write_random_weights


def four_layer_teacher(out_dir: Path, name: str = "llama-bpe") -> Path:
    _, overrides = TINY_MODELS[name]
    tokenizer = build_bpe_tokenizer(out_dir)
    write_random_weights(out_dir, {**overrides, "num_hidden_layers": 4}, tokenizer, seed=7)
    return out_dir


@pytest.mark.parametrize(("total", "keep", "expected"), [
    (4, "2", [0, 3]),  # a count: first and last
    (5, "3", [0, 2, 4]),
    (7, "0.5", [0, 2, 4, 6]),  # a share: round(3.5) = 4 layers, spread over 0..6 in steps of 2
    (30, "0.5", [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]),  # i * 29 / 14, rounded
    (3, "1", [0]),
    (3, "3", [0, 1, 2]),
])
def test_kept_layers_are_spread_evenly_with_first_and_last_kept(total, keep, expected):
    assert kept_layers(total, keep) == expected


@pytest.mark.parametrize(("keep", "message"), [("0", "keeps no layer"), ("9", "only 4 layers"),
                                               ("half", "a number of layers")])
def test_impossible_layer_counts_are_refused(keep, message):
    with pytest.raises(EdgepackError, match=message):
        kept_layers(4, keep)


def test_the_student_holds_the_teachers_kept_layers_and_decodes_with_a_kv_cache(tmp_path):
    from transformers import AutoModelForCausalLM

    teacher_dir = four_layer_teacher(tmp_path / "teacher")
    assert student_from_teacher(teacher_dir, "2", tmp_path / "student") == [0, 3]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 2
    for student_index, teacher_index in enumerate([0, 3]):
        for name, value in student.model.layers[student_index].state_dict().items():
            assert torch.equal(value, teacher.model.layers[teacher_index].state_dict()[name]), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert (tmp_path / "student" / "tokenizer.json").is_file()
    # the KV cache is addressed by layer index: decoding step by step must give the logits of one full pass
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        full = student(ids).logits[0, -1]
        cached = student(ids[:, :-1], use_cache=True)
        step = student(ids[:, -1:], past_key_values=cached.past_key_values, use_cache=True).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-4)


def test_per_layer_config_lists_follow_the_kept_layers(tmp_path):
    import json

    teacher_dir = four_layer_teacher(tmp_path / "teacher", "qwen3-bpe")
    config = json.loads((teacher_dir / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config["use_sliding_window"] = True
    (teacher_dir / "config.json").write_text(json.dumps(config))
    student_from_teacher(teacher_dir, "3", tmp_path / "student")  # layers 0, 2 (round(1.5)), 3
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3
    assert saved["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]


def test_a_student_with_another_vocabulary_is_refused_naming_the_first_differing_tokens(tiny_model):
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(tiny_model("llama-bpe"))
    student = AutoTokenizer.from_pretrained(tiny_model("llama-spm"))
    with pytest.raises(EdgepackError, match=r"different vocabularies .* first: id \d+: teacher '.*' vs student"):
        check_same_vocabulary(teacher, student, "teacher", "student")
    check_same_vocabulary(teacher, AutoTokenizer.from_pretrained(tiny_model("qwen2-bpe")), "a", "b")  # same tokenizer
