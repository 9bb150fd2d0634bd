"""GGUF -> Hugging Face directory: dequantized weights, config.json and a rebuilt tokenizer.

Supports the llama-style families (llama, qwen2, qwen3), quantized or not. The q/k row permutation our
converter applies for llama is undone; the tokenizer is rebuilt from the GGUF vocabulary (byte-level BPE with
its pre-tokenizer, or SentencePiece), with the chat template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from converters.gguf.from_hf import unpermute_from_interleaved_rope
from edgepack.core.errors import EdgepackError, UnsupportedModelError
from edgepack.core.fileio import atomic_output_dir, refuse_existing
from edgepack.core.gguf_file import metadata_value, open_reader
from edgepack.core.progress import progress_bar

# GGUF tensor names -> HF names, for the families the importer rebuilds (all share the llama layout).
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_HF_FAMILIES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SHARD_BYTES = 2 << 30


def hf_tensor_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in the importer")


ORIGIN_FILE = ".edgepack-origin.json"  # hidden: left out of the model's fingerprint like other markers


def import_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "f32", force: bool = False,
                show_progress: bool = True) -> Path:
    """Write a Hugging Face model directory at `out_dir` from `gguf_path`."""
    if dtype not in _DTYPES:
        raise EdgepackError(f"unknown dtype {dtype!r}; accepted: {', '.join(_DTYPES)}")
    refuse_existing(out_dir, force)
    reader = open_reader(gguf_path)
    arch = str(metadata_value(reader, "general.architecture", ""))
    if arch not in _HF_FAMILIES:
        raise UnsupportedModelError(f"importing GGUF architecture {arch!r} is not supported; "
                                    f"supported: {', '.join(_HF_FAMILIES)}")
    if any(t.name.startswith("rope_freqs") for t in reader.tensors):
        raise UnsupportedModelError("this GGUF carries llama3 rope frequency factors (rope_freqs), whose "
                                    "rope_scaling parameters cannot be recovered; import is not supported")
    meta = _read_meta(reader, arch)
    with atomic_output_dir(out_dir) as tmp:
        _write_weights(reader, arch, meta, tmp, _DTYPES[dtype], show_progress, label=out_dir.name)
        config = _config(meta, arch, dtype, tied="output.weight" not in {t.name for t in reader.tensors})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_tokenizer(reader, meta, tmp)
        (tmp / ORIGIN_FILE).write_text(json.dumps(_origin(reader, gguf_path, dtype), indent=2) + "\n")
    return out_dir


def _origin(reader: gguf.GGUFReader, gguf_path: Path, dtype: str) -> dict[str, Any]:
    """Where the imported weights came from: every figure measured against this model is relative to them."""
    types = sorted({t.tensor_type.name for t in reader.tensors})
    quantized = [name for name in types if name not in ("F32", "F16", "BF16")]
    note = (f"imported from {gguf_path.name}, whose weights are {', '.join(types)}, "
            f"{'dequantized' if quantized else 'converted'} to {dtype}")
    if quantized:
        note += ("; quality figures are relative to these dequantized weights, not to the model's original "
                 "full-precision weights")
    return {"imported_from": gguf_path.name, "tensor_types": types, "dtype": dtype, "note": note}


def _read_meta(reader: gguf.GGUFReader, arch: str) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        return metadata_value(reader, f"{arch}.{name}", default)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    return {
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rope_scaling_type": key("rope.scaling.type"),
        "rope_scaling_factor": key("rope.scaling.factor"),
        "name": metadata_value(reader, "general.name", "imported"),
    }


def _write_weights(reader: gguf.GGUFReader, arch: str, meta: dict[str, Any], out_dir: Path,
                   dtype: torch.dtype, show_progress: bool, label: str) -> None:
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    weight_map: dict[str, str] = {}
    written: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(written) + 1:05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            for tensor_name in shard:
                weight_map[tensor_name] = name
            written.append(name)
            shard, shard_bytes = {}, 0

    with progress_bar(f"{label}: dequantizing tensors", len(reader.tensors), show_progress) as advance:
        for tensor in reader.tensors:
            values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            weight = torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
            name = hf_tensor_name(tensor.name)
            if arch == "llama" and ".attn_q." in tensor.name:
                weight = unpermute_from_interleaved_rope(weight, meta["num_attention_heads"])
            elif arch == "llama" and ".attn_k." in tensor.name:
                weight = unpermute_from_interleaved_rope(weight, meta["num_key_value_heads"])
            weight = weight.to(dtype).contiguous()
            shard[name] = weight
            shard_bytes += weight.numel() * weight.element_size()
            if shard_bytes >= SHARD_BYTES:
                flush()
            advance(1)
    flush()
    if len(written) == 1:
        (out_dir / written[0]).rename(out_dir / "model.safetensors")
    else:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _config(meta: dict[str, Any], arch: str, dtype: str, tied: bool) -> dict[str, Any]:
    model_type, hf_class = _HF_FAMILIES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        **{k: meta[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                                "rope_theta")},
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype],
    }
    if meta["rope_scaling_type"] == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta["rope_scaling_factor"])}
    elif meta["rope_scaling_type"] not in (None, "none"):
        raise UnsupportedModelError(f"rope scaling {meta['rope_scaling_type']!r} cannot be imported; "
                                    "supported: none, linear")
    if arch == "qwen2":
        config["attention_bias"] = True
    return config


def _write_tokenizer(reader: gguf.GGUFReader, meta: dict[str, Any], out_dir: Path) -> None:
    from converters.gguf.import_tokenizer import write_tokenizer

    vocab_size = write_tokenizer(reader, out_dir)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["vocab_size"] = vocab_size
    for role in ("bos", "eos", "pad"):
        token_id = metadata_value(reader, f"tokenizer.ggml.{role}_token_id")
        if token_id is not None:
            config[f"{role}_token_id"] = int(token_id)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def import_gguf_checked(gguf_path: Path, out_dir: Path, *, dtype: str = "f32", force: bool = False):
    """`edgepack import-gguf`: import, then check that the rebuilt tokenizer gives llama.cpp's tokens."""
    from converters.gguf.parity import check_tokenizer_parity

    import_gguf(gguf_path, out_dir, dtype=dtype, force=force)
    return check_tokenizer_parity(gguf_path, out_dir)
