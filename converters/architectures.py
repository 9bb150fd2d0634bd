"""The architectures our HF -> GGUF converter supports, one declarative entry each.

An entry says how a family's Hugging Face checkpoint differs from what llama.cpp expects: the GGUF
architecture name, whether q/k rows must be permuted from HF's rotate-half rope layout to GGML's
interleaved one, whether norm weights are stored as (w - 1), whether a sliding window applies, and which
extra hyper-parameters the family carries. Tensor renames come from gguf-py's TensorNameMap for that
GGUF architecture; `extra_renames` only lists what the map does not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gguf

from edgepack.core.errors import UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    name: str  # our name, also the GGUF general.architecture
    gguf_arch: gguf.MODEL_ARCH
    hf_model_types: tuple[str, ...]
    hf_classes: tuple[str, ...]
    permute_qk: bool = False  # llama.cpp's LLAMA rope is interleaved; HF stores rotate-half rows
    norm_offset: float = 0.0  # gemma stores RMSNorm weights as (w - 1): add this to every norm weight
    writes_sliding_window: bool = False
    extra_renames: dict[str, str] = field(default_factory=dict)
    skip_tensor_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    notes: str = ""


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="llama",
        gguf_arch=gguf.MODEL_ARCH.LLAMA,
        hf_model_types=("llama", "mistral"),
        hf_classes=("LlamaForCausalLM", "MistralForCausalLM"),
        permute_qk=True,
        notes="Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral-style",
    ),
    Architecture(
        name="qwen2",
        gguf_arch=gguf.MODEL_ARCH.QWEN2,
        hf_model_types=("qwen2",),
        hf_classes=("Qwen2ForCausalLM",),
    ),
    Architecture(
        name="qwen3",
        gguf_arch=gguf.MODEL_ARCH.QWEN3,
        hf_model_types=("qwen3",),
        hf_classes=("Qwen3ForCausalLM",),
    ),
    Architecture(
        name="gemma3",
        gguf_arch=gguf.MODEL_ARCH.GEMMA3,
        hf_model_types=("gemma3_text",),
        hf_classes=("Gemma3ForCausalLM",),
        norm_offset=1.0,
        writes_sliding_window=True,
        notes="text-only Gemma 3 (Gemma3ForCausalLM)",
    ),
    Architecture(
        name="phi3",
        gguf_arch=gguf.MODEL_ARCH.PHI3,
        hf_model_types=("phi3",),
        hf_classes=("Phi3ForCausalLM",),
        writes_sliding_window=True,
    ),
)


def supported_summary() -> str:
    return ", ".join(f"{arch.name} ({'/'.join(arch.hf_model_types)})" for arch in ARCHITECTURES)


def architecture_for_config(config: dict[str, Any]) -> Architecture:
    """The entry for a config.json, or a refusal that lists what is supported."""
    model_type = config.get("model_type", "")
    for arch in ARCHITECTURES:
        if model_type in arch.hf_model_types:
            return arch
    hint = ""
    if model_type == "gemma3":
        hint = " (this is the multimodal Gemma 3; only the text model, model_type gemma3_text, is supported)"
    raise UnsupportedModelError(
        f"unsupported architecture: model_type {model_type!r}{hint}; supported: {supported_summary()}")


def architecture_by_name(name: str) -> Architecture:
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise UnsupportedModelError(f"unsupported GGUF architecture {name!r}; supported: {supported_summary()}")
