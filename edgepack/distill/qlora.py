"""QLoRA: low-rank adapters trained on a 4-bit copy of the student's weights (bitsandbytes NF4 with double
quantization), then merged into the full-precision weights.

The frozen base is held in 4 bits (about a quarter of float32's memory, the point of QLoRA on a GPU); its forward
pass dequantizes each weight to the compute dtype. The adapters learn against that 4-bit base, and at the end they
are added to the original float32 weights (the base is read again from the student's folder), so the student that
`edgepack build` takes is a plain full-precision model: each linear weight moved by a product of rank `--lora`.
bitsandbytes runs this on a CUDA GPU, and on a CPU too (slower: every forward pass dequantizes)."""

from __future__ import annotations

from pathlib import Path

import torch

from edgepack.core.errors import EdgepackError


def load_4bit_student(start_dir: Path, device: str, precision: str):
    """The student with its linear layers in NF4 (embeddings, norms and the output head stay in float32); that
    bitsandbytes is installed was checked with the run's other extras (run._require_extras)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=["lm_head"])
    return AutoModelForCausalLM.from_pretrained(start_dir, quantization_config=config, dtype=torch.float32,
                                                device_map={"": device})


def merge_into_full_precision(trained, start_dir: Path):
    """The adapters of `trained` (a peft model on the 4-bit base) added to the float32 weights in `start_dir`."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    adapters = {name: tensor.detach().to("cpu", torch.float32)
                for name, tensor in get_peft_model_state_dict(trained).items()}
    config = trained.peft_config["default"]
    base = AutoModelForCausalLM.from_pretrained(start_dir, dtype=torch.float32)
    model = get_peft_model(base, config)
    result = set_peft_model_state_dict(model, adapters)
    if result.unexpected_keys:
        raise EdgepackError(f"the trained adapters do not fit the student's weights: {result.unexpected_keys[:3]}")
    return model.merge_and_unload()


def four_bit_linears(model) -> int:
    """How many linear layers hold 4-bit weights (what the adapters are really trained against)."""
    from bitsandbytes.nn import Linear4bit

    return sum(1 for module in model.modules() if isinstance(module, Linear4bit))
