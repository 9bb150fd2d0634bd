"""Model hyper-parameters from config.json to GGUF metadata (and the rope tensors some configs need)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from converters.architectures import Architecture
from edgepack.core.errors import UnsupportedModelError
from edgepack.core.progress import say


@dataclass(frozen=True)
class HParams:
    """The hyper-parameters the converter needs, read once from config.json."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    context_length: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    rope_dim: int
    tie_embeddings: bool


def read_hparams(config: dict[str, Any]) -> HParams:
    def need(key: str) -> Any:
        if key not in config or config[key] is None:
            raise UnsupportedModelError(f"config.json has no {key!r}, which the converter needs")
        return config[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    head_dim = int(config.get("head_dim") or hidden // heads)
    partial = float(config.get("partial_rotary_factor") or 1.0)
    eps = config.get("rms_norm_eps", config.get("layer_norm_eps"))
    return HParams(
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(need("intermediate_size")),
        context_length=int(need("max_position_embeddings")),
        vocab_size=int(need("vocab_size")),
        norm_eps=float(eps if eps is not None else 1e-6),
        rope_theta=float(config.get("rope_theta") or 10000.0),
        rope_dim=int(head_dim * partial),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def write_hparams(writer: gguf.GGUFWriter, arch: Architecture, config: dict[str, Any], hp: HParams) -> None:
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden_size)
    writer.add_block_count(hp.num_layers)
    writer.add_feed_forward_length(hp.intermediate_size)
    writer.add_head_count(hp.num_heads)
    writer.add_head_count_kv(hp.num_kv_heads)
    writer.add_layer_norm_rms_eps(hp.norm_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.rope_dim)
    writer.add_vocab_size(hp.vocab_size)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    if arch.writes_sliding_window and config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
        if arch.name == "phi3" and int(config["sliding_window"]) < hp.context_length:
            say(f"note: llama.cpp runs phi3 without its sliding window ({config['sliding_window']} tokens); "
                "past that much context its outputs differ from transformers'")
    if arch.name == "gemma3":
        _check_gemma3_attention_scale(config, hp)
        if config.get("rope_local_base_freq"):
            writer.add_rope_freq_base_swa(float(config["rope_local_base_freq"]))
    _write_rope_scaling(writer, config, hp)


def _check_gemma3_attention_scale(config: dict[str, Any], hp: HParams) -> None:
    # llama.cpp scales gemma3 queries by 1/sqrt(head_dim); a config asking for another scale would
    # silently give different logits, so refuse it rather than convert it wrongly.
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and int(scalar) != hp.head_dim:
        raise UnsupportedModelError(
            f"gemma3 with query_pre_attn_scalar={scalar} (head_dim {hp.head_dim}) is not supported: "
            "llama.cpp scales queries by 1/sqrt(head_dim)")


def _write_rope_scaling(writer: gguf.GGUFWriter, config: dict[str, Any], hp: HParams) -> None:
    scaling = config.get("rope_scaling")
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif kind == "llama3":
        pass  # expressed as the rope_freqs tensor, see rope_tensors()
    elif kind in ("longrope", "su"):
        original = int(config.get("original_max_position_embeddings") or hp.context_length)
        writer.add_rope_scaling_orig_ctx_len(original)
        scale = hp.context_length / original
        attn_factor = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
        writer.add_rope_scaling_attn_factors(attn_factor)
    else:
        raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported; supported: "
                                    "linear, yarn, llama3, longrope")


def rope_tensors(config: dict[str, Any], hp: HParams) -> dict[str, np.ndarray]:
    """Extra F32 tensors that carry rope scaling (llama3 frequency factors, longrope factors)."""
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": _llama3_rope_factors(scaling, hp)}
    if kind in ("longrope", "su"):
        long = np.asarray(scaling["long_factor"], dtype=np.float32)
        short = np.asarray(scaling["short_factor"], dtype=np.float32)
        if len(long) != hp.rope_dim // 2 or len(short) != hp.rope_dim // 2:
            raise UnsupportedModelError(f"longrope factors must have {hp.rope_dim // 2} entries")
        return {
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": long,
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": short,
        }
    return {}


def _llama3_rope_factors(scaling: dict[str, Any], hp: HParams) -> np.ndarray:
    # Llama 3.1's frequency-dependent rope scaling, expressed as a divisor per rotary frequency.
    factor = float(scaling.get("factor", 8.0))
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    original = int(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen = original / low_freq_factor
    high_wavelen = original / high_freq_factor
    exponents = np.arange(0, hp.rope_dim, 2, dtype=np.float64) / hp.rope_dim
    divisors = []
    for freq in 1.0 / (hp.rope_theta ** exponents):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            divisors.append(1.0)
        elif wavelen > low_wavelen:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)
