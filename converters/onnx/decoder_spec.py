"""What the decode-optimized ONNX graph needs to know about a model, read from its config once: sizes, the norm
and activation flavours of its family, each layer's attention window and rotary table, or why the fast graph
cannot express it (then optimum-onnx's export is used instead).

Rotary tables come from transformers' own rope initialisers (default, linear, llama3, yarn), so scaling rules are
never re-derived here; each table's attention factor is folded into its cos/sin, as transformers does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.architectures import architecture_for_config
from converters.hf_model import HFModelDir

# transformers' activations that the graph has a fused operator for
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
MAX_ROTARY_POSITIONS = 131072  # a larger trained context is cut here (tables grow 512 bytes a position)


class NotExpressible(Exception):
    """The fast graph cannot express this model; the message says what (the converter falls back)."""


@dataclass(frozen=True)
class RotaryTable:
    cos: np.ndarray  # (positions, rotary_dim / 2), float32, attention factor included
    sin: np.ndarray


@dataclass(frozen=True)
class DecoderSpec:
    family: str  # our architecture name: llama, qwen2, qwen3, gemma3, phi3
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    norm_eps: float
    tied_embeddings: bool
    activation: str  # "silu" or "gelu_tanh"
    qkv_bias: bool  # qwen2
    qk_norm: bool  # qwen3, gemma3: RMSNorm over each head of q and k before rotary
    norm_offset: float  # gemma stores RMSNorm weights as w - 1
    embedding_scale: float | None  # gemma multiplies embeddings by sqrt(hidden)
    sandwich_norms: bool  # gemma3: norms after attention and after the MLP as well as before
    attention_scale: float | None  # None: 1 / sqrt(head_dim)
    attention_softcap: float | None
    final_softcap: float | None
    layer_windows: tuple[int | None, ...]  # per layer: tokens a query sees (itself included), None for all
    layer_rotary: tuple[int, ...]  # per layer: index into `rotary`
    rotary: tuple[RotaryTable, ...]
    packed_qkv_name: bool  # phi3 stores q, k and v as one qkv_proj (and gate and up as one gate_up_proj)

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim


def _rotary_table(config, positions: int) -> RotaryTable:
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise NotExpressible(f"rope type {rope_type!r} changes with the sequence length (the fast graph takes "
                             f"{', '.join(STATIC_ROPE_TYPES)})")
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    # float32 products, as transformers computes them, so large positions round the same way
    angles = np.outer(np.arange(positions, dtype=np.float32), inv_freq.float().numpy()).astype(np.float32)
    return RotaryTable(cos=(np.cos(angles) * attention_factor).astype(np.float32),
                       sin=(np.sin(angles) * attention_factor).astype(np.float32))


def decoder_spec(model: HFModelDir) -> DecoderSpec:
    """The spec of `model`, or NotExpressible saying what the fast graph lacks for it."""
    import copy

    from transformers import AutoConfig

    arch = architecture_for_config(model.config)
    config = AutoConfig.from_pretrained(Path(model.path))
    text = getattr(config, "text_config", None) or config
    hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    if head_dim % 16:
        raise NotExpressible(f"head size {head_dim}: ONNX Runtime's GroupQueryAttention takes multiples of 16")
    if float(getattr(text, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise NotExpressible("a partial rotary embedding (partial_rotary_factor < 1)")
    act_name = getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", "silu")
    if act_name not in ACTIVATIONS:
        raise NotExpressible(f"activation {act_name!r} (the fast graph takes {', '.join(sorted(ACTIVATIONS))})")
    layers = int(text.num_hidden_layers)
    positions = min(int(getattr(text, "max_position_embeddings", 4096)), MAX_ROTARY_POSITIONS)

    layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * layers)
    window = getattr(text, "sliding_window", None)
    if arch.name == "phi3":  # transformers' Phi-3 windows every layer when the config has a window
        layer_types = ["sliding_attention" if window else "full_attention"] * layers
    if arch.name == "qwen2" and not getattr(text, "use_sliding_window", False):
        layer_types = ["full_attention"] * layers
    windows = tuple(int(window) if kind == "sliding_attention" and window else None for kind in layer_types)

    tables = [_rotary_table(text, positions)]
    layer_rotary = [0] * layers
    if arch.name == "gemma3":  # windowed layers rotate with their own base and no scaling
        local = copy.deepcopy(text)
        local.rope_theta = text.rope_local_base_freq
        local.rope_scaling = {"rope_type": "default"}
        tables.append(_rotary_table(local, positions))
        layer_rotary = [1 if kind == "sliding_attention" else 0 for kind in layer_types]

    gemma = arch.name == "gemma3"
    return DecoderSpec(
        family=arch.name, hidden=hidden, layers=layers, heads=heads, kv_heads=int(text.num_key_value_heads),
        head_dim=head_dim, intermediate=int(text.intermediate_size), vocab=int(text.vocab_size),
        norm_eps=float(text.rms_norm_eps), tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        activation=ACTIVATIONS[act_name], qkv_bias=arch.name == "qwen2", qk_norm=arch.name in ("qwen3", "gemma3"),
        norm_offset=arch.norm_offset, embedding_scale=hidden ** 0.5 if gemma else None, sandwich_norms=gemma,
        attention_scale=float(text.query_pre_attn_scalar) ** -0.5 if gemma else None,
        attention_softcap=getattr(text, "attn_logit_softcapping", None) if gemma else None,
        final_softcap=getattr(text, "final_logit_softcapping", None) if gemma else None,
        layer_windows=windows, layer_rotary=tuple(layer_rotary), rotary=tuple(tables),
        packed_qkv_name=arch.name == "phi3")
