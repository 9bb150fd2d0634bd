"""Peak memory of one HF -> GGUF conversion, run as its own process by test_gguf_convert.

`build DIR` writes a ~550 MiB llama checkpoint (F32, tensors of 16-24 MiB) plus a small tokenizer; `measure DIR`
converts it to F16 and prints {"weights_mib", "growth_mib"}: how far the peak RSS rose above the RSS right
before conversion began.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil

HIDDEN = 2048
FFN = 3072  # 3072 x 2048 x 4 bytes = 24 MiB
LAYERS = 4


def build(root: Path) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent))
    from synth_models import build_bpe_tokenizer

    model_dir = root / "model"
    tokenizer = build_bpe_tokenizer(model_dir)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": 16,
              "num_key_value_heads": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
              "vocab_size": len(tokenizer), "tie_word_embeddings": True, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    (model_dir / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(len(tokenizer), HIDDEN, generator=generator),
               "model.norm.weight": torch.ones(HIDDEN)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            tensors[prefix + name + ".weight"] = torch.randn(FFN, HIDDEN, generator=generator) * 0.02
        tensors[prefix + "mlp.down_proj.weight"] = torch.randn(HIDDEN, FFN, generator=generator) * 0.02
        tensors[prefix + "self_attn.q_proj.weight"] = torch.randn(FFN, HIDDEN, generator=generator)[:HIDDEN] * 0.02
        for name in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
            tensors[prefix + name + ".weight"] = torch.randn(HIDDEN, HIDDEN, generator=generator) * 0.02
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[prefix + name + ".weight"] = torch.ones(HIDDEN)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(model_dir / "model.safetensors"))


def measure(root: Path) -> None:
    from transformers import AutoTokenizer

    from converters.gguf.from_hf import convert_hf_to_gguf
    from edgepack.measure.profiler import peak_rss_bytes  # VmHWM: ru_maxrss survives fork+exec (the parent's peak)

    model_dir = root / "model"
    AutoTokenizer.from_pretrained(model_dir)  # warm the tokenizer code paths
    weights = (model_dir / "model.safetensors").stat().st_size
    before = psutil.Process().memory_info().rss
    convert_hf_to_gguf(model_dir, root / "out.gguf", outtype="f16", show_progress=False)
    peak = peak_rss_bytes()
    print(json.dumps({"weights_mib": weights / 2**20, "growth_mib": (peak - before) / 2**20,
                      "before_mib": before / 2**20, "peak_mib": peak / 2**20}))


if __name__ == "__main__":
    {"build": build, "measure": measure}[sys.argv[1]](Path(sys.argv[2]))
