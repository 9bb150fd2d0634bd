"""Our decode-optimized ONNX graph against transformers, for every architecture the builder takes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from converters.hf_model import HFModelDir
from converters.logit_parity import compare_logits
from converters.onnx.block_quant import dequantize_blocks, quantize_blocks, quantize_blocks_with_minimum
from converters.onnx.decoder_graph import PrecisionPlan, WeightPrecision, write_decoder_graph
from converters.onnx.decoder_spec import decoder_spec
from converters.registry import ConvertOptions
from edgepack.convert import convert
from edgepack.student.inspect import inspect_path
from runtimes.base import GenerationOptions, LoadOptions
from runtimes.registry import open_runtime
from runtimes.torch_reference import TorchRuntime

QUIET = ConvertOptions(show_progress=False)
TEXT = ("The lighthouse keeper counted the ships every evening, writing each name in a narrow blue notebook. "
        "On Tuesday there were 12 fishing boats, 3 ferries and one old sailing yacht called Persistence.")


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2-bpe", "qwen3-bpe", "phi3-spm", "gemma3-spm"])
def test_our_graph_gives_transformers_logits_and_greedy_text(name, tiny_model, tmp_path):
    """gemma3-spm's sliding window (16) is shorter than the text, so windowed attention is really compared."""
    model = tiny_model(name)
    (variant,) = convert(model, ["onnx-fp32"], tmp_path, QUIET)
    assert variant.converter.startswith("edgepack decoder graph")
    reference = TorchRuntime(model)
    ours = open_runtime(variant.path, LoadOptions(context_length=128))
    try:
        assert ours.shares_kv_buffer
        ids = reference.tokenize(TEXT)[:60]
        assert len(ids) > 40
        compare_logits(reference.logits(ids), ours.logits(ids), label=name, relative_tolerance=1e-4)
        options = GenerationOptions(max_tokens=24, ignore_eos=True)
        assert ours.complete(TEXT[:80], options).token_ids == reference.complete(TEXT[:80], options).token_ids
    finally:
        ours.close()
        reference.close()


def _reference_with_weights(model_dir, tmp_path, transform):
    """transformers' model with every linear weight (and the embedding) replaced by transform(name, weight)."""
    from transformers import AutoModelForCausalLM

    copy = tmp_path / "reference"
    shutil.copytree(model_dir, copy)
    hf = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32)
    with torch.no_grad():
        for module_name, module in hf.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.from_numpy(transform(module_name, module.weight.numpy())))
    hf.save_pretrained(copy)
    return copy


@pytest.mark.parametrize("minimum", [False, True])
def test_quantized_graph_computes_with_exactly_the_weights_the_blocks_hold(minimum, tiny_model, tmp_path):
    """4-bit projections (with or without a float block minimum) and an 8-bit shared embedding/head, float compute
    (accuracy level 0): the graph must equal transformers running on the dequantized weights."""
    model_dir = tiny_model("llama-bpe")  # tied embeddings: the 8-bit table serves the head too
    four = WeightPrecision(bits=4, block_size=32, block_minimum=minimum)
    eight = WeightPrecision(bits=8, block_size=32)
    plan = PrecisionPlan(linear=four, head=eight, embedding=eight, accuracy_level=0)
    out = tmp_path / "graph"
    out.mkdir()
    model = HFModelDir(model_dir)
    write_decoder_graph(model, decoder_spec(model), plan, out / "model.onnx")
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / side).exists():
            shutil.copy(model_dir / side, out / side)

    def restored(name, weight):
        if name == "model.embed_tokens" or name == "lm_head":
            return dequantize_blocks(quantize_blocks(weight, 8, 32))
        if minimum:
            return dequantize_blocks(quantize_blocks_with_minimum(weight, 4, 32, search=False))
        return dequantize_blocks(quantize_blocks(weight, 4, 32))

    reference = TorchRuntime(_reference_with_weights(model_dir, tmp_path, restored))
    ours = open_runtime(out, LoadOptions(context_length=128))
    try:
        ids = reference.tokenize(TEXT)[:48]
        compare_logits(reference.logits(ids), ours.logits(ids), label="dequantized", relative_tolerance=1e-4)
    finally:
        ours.close()
        reference.close()


def test_quantized_kinds_record_what_each_weight_became(tiny_model, tmp_path):
    variants = {v.kind: v for v in convert(tiny_model("qwen3-bpe"), ["onnx-int8", "onnx-int4"], tmp_path, QUIET)}
    int8 = json.loads((variants["onnx-int8"].path / "weights.json").read_text())
    assert set(int8["bytes_by_precision"]) == {"8-bit/32 nearest"}
    int4 = json.loads((variants["onnx-int4"].path / "weights.json").read_text())
    precisions = {t["name"]: t["precision"] for t in int4["tensors"]}
    assert precisions["embed_tokens"].startswith("8-bit/32")
    assert precisions["layers.0.attn.q_k_v"] == "4-bit/32+min search"
    # per block of 32 4-bit weights: 16 bytes of codes, a float32 scale and a float32 minimum; per row, the
    # (all-zero) 4-bit zero points two to a byte
    q_k_v = next(t for t in int4["tensors"] if t["name"] == "layers.0.attn.q_k_v")
    rows, blocks = q_k_v["shape"][0], q_k_v["shape"][1] // 32
    assert q_k_v["bytes"] == rows * blocks * (16 + 4 + 4) + rows * -(-blocks // 2)
    assert variants["onnx-int4"].bytes < variants["onnx-int8"].bytes
    summary = inspect_path(variants["onnx-int4"].path)  # what `edgepack inspect` shows
    assert summary.graph == "edgepack-decoder-gqa" and summary.architecture == "qwen3"
    assert summary.bytes == variants["onnx-int4"].bytes
    assert sum(summary.quant_types.values()) == pytest.approx(1.0)
    assert set(summary.quant_types) == {"4-bit/32+min search", "8-bit/32 search"}


def test_a_model_our_graph_cannot_express_falls_back_to_optimum(tiny_model, tmp_path):
    """Head size 8: GroupQueryAttention takes multiples of 16, so optimum-onnx exports it."""
    model = tmp_path / "narrow-heads"
    shutil.copytree(tiny_model("llama-bpe"), model)
    config = json.loads((model / "config.json").read_text())
    config.update(num_attention_heads=32, num_key_value_heads=16, head_dim=8)
    (model / "config.json").write_text(json.dumps(config))
    (variant,) = convert(model, ["onnx-fp32"], tmp_path / "out", QUIET)
    assert variant.converter.startswith("optimum-onnx")
    runtime = open_runtime(variant.path, LoadOptions(context_length=64))
    try:
        assert not runtime.shares_kv_buffer
        assert np.isfinite(runtime.logits(runtime.tokenize(TEXT)[:16])).all()
    finally:
        runtime.close()
