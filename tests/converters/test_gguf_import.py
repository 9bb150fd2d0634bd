"""GGUF -> HF import: tokenizer parity with llama.cpp, and the imported model re-converts with logit parity."""

from __future__ import annotations

import json

import pytest

from converters.gguf.parity import check_logit_parity, check_tokenizer_parity
from converters.gguf.to_hf import import_gguf
from converters.registry import ConvertOptions
from edgepack.convert.stage import convert
from edgepack.core.errors import EdgepackError, UnsupportedModelError
from edgepack.student.load import load_student

QUIET = ConvertOptions(show_progress=False)


@pytest.mark.parametrize("name,kind", [("llama-bpe", "gguf-q8_0"), ("llama-spm", "gguf-q4_k_m"),
                                       ("qwen2-bpe", "gguf-f16"), ("qwen3-bpe", "gguf-q8_0")])
def test_import_round_trip(name, kind, tiny_model, tmp_path):
    (variant,) = convert(tiny_model(name), [kind], tmp_path / "gguf", QUIET)
    imported = import_gguf(variant.path, tmp_path / "hf", show_progress=False)

    # (1) the rebuilt tokenizer tokenizes like llama.cpp does on the source GGUF (probe + chat template)
    parity = check_tokenizer_parity(variant.path, imported)
    assert parity.texts_checked == 2 and parity.tokens_checked > 100

    # (2) our converter on the imported model gives llama.cpp logits equal to transformers' on it
    (f32,) = convert(imported, ["gguf-f32"], tmp_path / "again", ConvertOptions(check_logits=True,
                                                                                show_progress=False))
    result = check_logit_parity(f32.path, imported)
    assert result.argmax_agreement > 0.95

    config = json.loads((imported / "config.json").read_text())
    original = json.loads((tiny_model(name) / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert config[key] == original[key]


def test_import_of_quantized_weights_stays_close_to_the_original(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    (q8,) = convert(tiny_model("llama-bpe"), ["gguf-q8_0"], tmp_path / "gguf", QUIET)
    imported = import_gguf(q8.path, tmp_path / "hf", show_progress=False)
    original = load_file(tiny_model("llama-bpe") / "model.safetensors")
    restored = load_file(imported / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        error = (restored[name] - original[name]).abs().max().item()
        scale = original[name].abs().max().item()
        assert error < scale / 100, name  # Q8_0 error, not a scrambled (unpermuted) layout
    assert torch.equal(restored["model.norm.weight"], original["model.norm.weight"])
    # every figure measured against the imported model is relative to the Q8_0 weights, and the model says so
    student = load_student(imported)
    assert "Q8_0" in student.origin and "dequantized to f32" in student.origin
    assert load_student(tiny_model("llama-bpe")).origin is None


def test_import_refuses_what_it_cannot_rebuild(tiny_model, tmp_path):
    (gemma,) = convert(tiny_model("gemma3-spm"), ["gguf-q8_0"], tmp_path, QUIET)
    with pytest.raises(UnsupportedModelError, match="supported: llama, qwen2, qwen3"):
        import_gguf(gemma.path, tmp_path / "hf", show_progress=False)
    assert not (tmp_path / "hf").exists()


def test_import_of_a_truncated_file_is_a_clear_error(tiny_model, tmp_path):
    (variant,) = convert(tiny_model("llama-bpe"), ["gguf-q8_0"], tmp_path, QUIET)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(variant.path.read_bytes()[: variant.bytes // 3])
    with pytest.raises(EdgepackError, match="truncated or corrupt"):
        import_gguf(truncated, tmp_path / "hf", show_progress=False)
    assert not (tmp_path / "hf").exists()
