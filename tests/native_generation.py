"""Greedy generation with each library's own loop (llama-cpp-python's and transformers' generate), used as
independent references: they share no code with edgepack's generation loop."""

from __future__ import annotations

import torch


def llama_cpp_greedy(llm, prompt_ids: list[int], max_tokens: int) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    produced: list[int] = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(produced) >= max_tokens:
            break
        produced.append(token)
    return produced


@torch.inference_mode()
def transformers_greedy(model, prompt_ids: list[int], max_tokens: int, eos_ids: set[int]) -> list[int]:
    output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                            pad_token_id=next(iter(eos_ids), 0))
    produced = output[0, len(prompt_ids):].tolist()
    for index, token in enumerate(produced):
        if token in eos_ids:
            return produced[:index]
    return produced
