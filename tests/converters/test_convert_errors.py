"""Bad input gets a clear error that says what was wrong and what is accepted, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from converters.gguf.from_hf import convert_hf_to_gguf
from converters.gguf.pretokenizers import identify_pretokenizer
from converters.registry import ConvertOptions
from edgepack.convert.stage import convert
from edgepack.core.errors import EdgepackError, UnsupportedModelError

QUIET = ConvertOptions(show_progress=False)


def copy_model(tiny_model, name, tmp_path):
    target = tmp_path / name
    shutil.copytree(tiny_model(name), target)
    return target


def test_unsupported_architecture_lists_the_supported_ones(tiny_model, tmp_path):
    model_dir = copy_model(tiny_model, "llama-bpe", tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as info:
        convert(model_dir, ["gguf-f16"], tmp_path / "out", QUIET)
    message = str(info.value)
    assert "gpt_neox" in message
    for name in ("llama", "qwen2", "qwen3", "gemma3", "phi3"):
        assert name in message
    assert not list((tmp_path / "out").glob("*.gguf"))


def test_directory_without_weights(tiny_model, tmp_path):
    model_dir = copy_model(tiny_model, "llama-bpe", tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(EdgepackError, match="has no weights: expected model.safetensors"):
        convert(model_dir, ["gguf-f16"], tmp_path / "out", QUIET)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub\\..\\..\\x.safetensors"])
def test_an_index_naming_shards_outside_the_folder_is_refused(tiny_model, tmp_path, shard):
    model_dir = copy_model(tiny_model, "llama-bpe", tmp_path)
    (model_dir / "model.safetensors").rename(tmp_path / "outside.safetensors")  # where "../" points
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EdgepackError, match="names shards outside the model folder"):
        convert(model_dir, ["gguf-f16"], tmp_path / "out", QUIET)
    assert not (tmp_path / "out" / "gguf-f16.gguf").exists()


def test_directory_without_tokenizer(tiny_model, tmp_path):
    model_dir = copy_model(tiny_model, "llama-bpe", tmp_path)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(EdgepackError, match="has no tokenizer"):
        convert(model_dir, ["gguf-f16"], tmp_path / "out", QUIET)


def test_missing_directory(tmp_path):
    with pytest.raises(EdgepackError, match="is not a directory"):
        convert(tmp_path / "nope", ["gguf-f16"], tmp_path / "out", QUIET)


def test_pickle_weights_need_allow_pickle(tiny_model, tmp_path):
    from safetensors.torch import load_file

    model_dir = copy_model(tiny_model, "llama-bpe", tmp_path)
    state = load_file(model_dir / "model.safetensors")
    torch.save(state, model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match="--allow-pickle"):
        convert(model_dir, ["gguf-f16"], tmp_path / "out", QUIET)
    (variant,) = convert(model_dir, ["gguf-f16"], tmp_path / "out",
                         ConvertOptions(allow_pickle=True, show_progress=False))
    assert variant.path.is_file()


def test_corrupt_safetensors(tiny_model, tmp_path):
    model_dir = copy_model(tiny_model, "llama-bpe", tmp_path)
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(EdgepackError, match="not a readable safetensors file"):
        convert(model_dir, ["gguf-f16"], tmp_path / "out", QUIET)


def test_existing_output_needs_force(tiny_model, tmp_path):
    convert(tiny_model("llama-bpe"), ["gguf-f16"], tmp_path, QUIET)
    before = (tmp_path / "gguf-f16.gguf").read_bytes()
    with pytest.raises(EdgepackError, match="already exists; pass --force"):
        convert(tiny_model("llama-bpe"), ["gguf-f16"], tmp_path, QUIET)
    assert (tmp_path / "gguf-f16.gguf").read_bytes() == before
    convert(tiny_model("llama-bpe"), ["gguf-f16"], tmp_path, ConvertOptions(force=True, show_progress=False))


def test_unknown_kind_lists_accepted(tiny_model, tmp_path):
    with pytest.raises(EdgepackError, match="unknown variant kind 'gguf-q9_9'.*gguf-q4_k_m"):
        convert(tiny_model("llama-bpe"), ["gguf-q9_9"], tmp_path, QUIET)


def test_a_failure_mid_write_leaves_no_file(tiny_model, tmp_path, monkeypatch):
    import converters.gguf.from_hf as hf_to_gguf

    real = hf_to_gguf._as_output_array
    calls = {"n": 0}

    def failing(tensor, ggml_type):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(tensor, ggml_type)

    monkeypatch.setattr(hf_to_gguf, "_as_output_array", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_hf_to_gguf(tiny_model("llama-bpe"), tmp_path / "model.gguf", show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unrecognised_pretokenizer_is_refused(tiny_model, tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers

    model_dir = copy_model(tiny_model, "llama-bpe", tmp_path)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=True)])
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer is not recognised"):
        identify_pretokenizer(tokenizer)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    with pytest.raises(UnsupportedModelError, match="not recognised"):
        convert(model_dir, ["gguf-f16"], tmp_path / "out", QUIET)


def test_check_logits_needs_f32(tiny_model, tmp_path):
    with pytest.raises(EdgepackError, match="add gguf-f32"):
        convert(tiny_model("llama-bpe"), ["gguf-f16"], tmp_path,
                ConvertOptions(check_logits=True, show_progress=False))


def test_truncated_gguf_does_not_load(tiny_model, tmp_path):
    from runtimes import llamacpp

    (variant,) = convert(tiny_model("llama-bpe"), ["gguf-q8_0"], tmp_path, QUIET)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(variant.path.read_bytes()[: variant.bytes // 2])
    with pytest.raises(EdgepackError, match="truncated, corrupt"):
        llamacpp.open_gguf(truncated)
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(EdgepackError, match="not a GGUF file"):
        llamacpp.open_gguf(not_gguf)
