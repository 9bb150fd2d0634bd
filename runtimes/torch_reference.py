"""The reference: the original Hugging Face model through transformers, in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_reference(model_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # long probe texts trigger a harmless max-length note

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_path)


@torch.inference_mode()
def sequence_logits(model, token_ids: list[int]) -> np.ndarray:
    return model(torch.tensor([token_ids])).logits[0].float().numpy()


@torch.inference_mode()
def greedy_tokens(model, token_ids: list[int], max_tokens: int, eos_ids: set[int]) -> list[int]:
    output = model.generate(torch.tensor([token_ids]), max_new_tokens=max_tokens, do_sample=False,
                            attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                            pad_token_id=next(iter(eos_ids), 0))
    produced = output[0, len(token_ids):].tolist()
    for index, token in enumerate(produced):
        if token in eos_ids:
            return produced[:index]
    return produced
