"""HF -> GGUF on every supported architecture: metadata, tokenizer parity, F32 logit parity, quantized files."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from native_generation import llama_cpp_greedy
from synth_models import TINY_MODELS

from converters.gguf.from_hf import permute_for_interleaved_rope, unpermute_from_interleaved_rope
from converters.gguf.parity import check_logit_parity
from converters.registry import ConvertOptions
from edgepack.convert.stage import convert
from edgepack.core.fileio import sha256_file
from edgepack.core.gguf_file import inspect_gguf, metadata_value, open_reader
from runtimes import llamacpp

QUIET = ConvertOptions(show_progress=False)


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory):
    """Each tiny model converted once to F32 (with logit parity) and Q4_K_M."""
    root = tmp_path_factory.mktemp("converted")
    results = {}

    def get(name: str):
        if name not in results:
            options = ConvertOptions(check_logits=True, show_progress=False)
            results[name] = convert(tiny_model(name), ["gguf-f32", "gguf-q4_k_m"], root / name, options)
        return results[name]

    return get


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_architecture_converts_with_parity(name, tiny_model, converted):
    variants = converted(name)  # tokenizer parity on both files and F32 logit parity ran inside
    assert [v.kind for v in variants] == ["gguf-f32", "gguf-q4_k_m"]
    for variant in variants:
        assert variant.path.is_file()
        assert variant.sha256 == sha256_file(variant.path)
        assert variant.bytes == variant.path.stat().st_size

    config = json.loads((tiny_model(name) / "config.json").read_text())
    reader = open_reader(variants[0].path)
    arch = metadata_value(reader, "general.architecture")
    assert arch == {"gemma3_text": "gemma3"}.get(config["model_type"], config["model_type"])
    assert metadata_value(reader, f"{arch}.context_length") == config["max_position_embeddings"]
    assert metadata_value(reader, f"{arch}.attention.head_count") == config["num_attention_heads"]
    assert metadata_value(reader, f"{arch}.attention.head_count_kv") == config["num_key_value_heads"]
    assert metadata_value(reader, f"{arch}.feed_forward_length") == config["intermediate_size"]
    assert metadata_value(reader, "tokenizer.chat_template")
    expected_tokenizer = "gpt2" if name.endswith("bpe") else "llama"
    assert metadata_value(reader, "tokenizer.ggml.model") == expected_tokenizer
    if expected_tokenizer == "gpt2":
        assert metadata_value(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(metadata_value(reader, "tokenizer.ggml.tokens")) == config["vocab_size"]
    # the F32 file is F32 throughout
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_q4_k_m_uses_k_quants_and_generates(name, converted):
    q4 = converted(name)[1]
    shares = inspect_gguf(q4.path).quant_types
    assert "Q4_K" in shares, shares  # hidden sizes are multiples of 256, so K-quants apply
    reader = open_reader(q4.path)
    assert metadata_value(reader, "edgepack.quant_type") == "Q4_K_M"
    assert "llama.cpp" in metadata_value(reader, "edgepack.quantizer")
    llm = llamacpp.open_gguf(q4.path, n_ctx=128)
    produced = llama_cpp_greedy(llm, llamacpp.tokenize(llm, "The robot", add_special=True), 8)
    assert len(produced) > 0


def test_q8_0_and_f16_and_bf16_kinds(tiny_model, tmp_path):
    variants = convert(tiny_model("qwen3-bpe"), ["gguf-f16", "gguf-bf16", "gguf-q8_0"], tmp_path, QUIET)
    types = {v.kind: set(inspect_gguf(v.path).quant_types) for v in variants}
    assert types["gguf-f16"] == {"F16", "F32"}  # norms stay F32
    assert types["gguf-bf16"] == {"BF16", "F32"}
    assert "Q8_0" in types["gguf-q8_0"]


def test_f16_weights_equal_the_rounded_originals(tiny_model, tmp_path):
    model_dir = tiny_model("qwen2-bpe")
    (variant,) = convert(model_dir, ["gguf-f16"], tmp_path, QUIET)
    from safetensors.torch import load_file

    original = load_file(model_dir / "model.safetensors")
    reader = open_reader(variant.path)
    tensors = {t.name: t for t in reader.tensors}
    down = np.asarray(tensors["blk.1.ffn_down.weight"].data)
    expected = original["model.layers.1.mlp.down_proj.weight"].to(torch.float16).numpy()
    assert down.shape == expected.shape
    assert np.array_equal(down, expected)


def test_permutation_round_trips_and_matches_interleaving():
    weight = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(4 * 8, 3)  # 4 heads of 8 rows
    permuted = permute_for_interleaved_rope(weight, 4)
    assert torch.equal(unpermute_from_interleaved_rope(permuted, 4), weight)
    # head 0's rows [0..3 | 4..7] (rotate-half) become pairs (0,4), (1,5), ... (interleaved)
    assert permuted[:8, 0].tolist() == weight[[0, 4, 1, 5, 2, 6, 3, 7], 0].tolist()


def test_sharded_bf16_checkpoint_converts(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model("llama-bpe")
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.save_pretrained(sharded, max_shard_size="1MB", safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    variants = convert(sharded, ["gguf-bf16", "gguf-q8_0"], tmp_path / "out", QUIET)
    assert metadata_value(open_reader(variants[0].path), "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    # bf16 weights are copied bit for bit
    reader = open_reader(variants[0].path)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = model.model.embed_tokens.weight.detach()
    got = torch.from_numpy(np.asarray(embd.data).copy()).view(torch.bfloat16).reshape(expected.shape)
    assert torch.equal(got, expected)


def test_logit_parity_catches_a_wrong_weight(tiny_model, tmp_path, monkeypatch):
    """The F32 check is real: a GGUF whose q/k rows were not permuted for llama.cpp's rope fails it."""
    import dataclasses

    import converters.gguf.from_hf as hf_to_gguf
    from converters.architectures import architecture_by_name
    from edgepack.core.errors import ParityError

    model_dir = tiny_model("llama-spm")
    unpermuted = dataclasses.replace(architecture_by_name("llama"), permute_qk=False)
    monkeypatch.setattr(hf_to_gguf, "architecture_for_config", lambda config: unpermuted)
    hf_to_gguf.convert_hf_to_gguf(model_dir, tmp_path / "wrong.gguf", outtype="f32", show_progress=False)
    with pytest.raises(ParityError, match="logit parity failed"):
        check_logit_parity(tmp_path / "wrong.gguf", model_dir)


def test_streaming_conversion_keeps_memory_near_one_tensor(tmp_path):
    """Peak memory of a conversion grows by far less than the model's size (tensors are written one by one)."""
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "memory_probe.py"
    for mode in ("build", "measure"):  # separate processes, so building the weights does not count
        result = subprocess.run([sys.executable, str(script), mode, str(tmp_path)], capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    # whole-model loading would add >= 550 MiB; one 24 MiB tensor plus its F16 copy is ~36 MiB
    assert probe["weights_mib"] >= 500
    assert probe["growth_mib"] < probe["weights_mib"] / 3, probe
