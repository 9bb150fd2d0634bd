"""Tiny random-weight models of every supported architecture, with real-style tokenizers built in code.

Hidden and feed-forward sizes are multiples of 256 so llama.cpp's K-quants really apply. Everything is seeded,
so the same call gives the same files. Tokenizers: a byte-level BPE with GPT-2's regex (like GPT-2, SmolLM,
Qwen) trained with `tokenizers`, and a SentencePiece BPE with byte fallback (like Llama 2, Gemma, Phi-3)
trained with `sentencepiece`, with ("spm") or without ("spm-no-prefix", as Gemma) a leading "▁".
"""

from __future__ import annotations

import io
from pathlib import Path

from edgepack.student.tiny import BASE_CONFIG, CHATML_TEMPLATE, TRAINING_TEXT, build_bpe_tokenizer, write_random_weights

__all__ = ["BASE_CONFIG", "CHATML_TEMPLATE", "TINY_MODELS", "build_bpe_tokenizer", "build_tiny_model"]

PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' + '\n' }}{% endif %}"
)
# Phi-3's added tokens: rstrip=True on the chat markers (llama.cpp reproduces that for models named phi3)
PHI3_ADDED_TOKENS = [("<|endoftext|>", False), ("<|assistant|>", True), ("<|end|>", True), ("<|user|>", True),
                     ("<|system|>", True)]
SPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '[' + message['role'] + '] ' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)

# name -> (tokenizer kind, config overrides). Every architecture the converter supports appears here.
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "llama-spm": ("spm", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}),
    "llama-bpe": ("bpe", {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                          "tie_word_embeddings": True}),
    "qwen2-bpe": ("bpe", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                          "tie_word_embeddings": True}),
    "qwen3-bpe": ("bpe", {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 64,
                          "tie_word_embeddings": True}),
    # a sliding window shorter than the 64-token logit check, so the windowed layers' masks are really compared
    "gemma3-spm": ("spm-no-prefix", {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
                                     "head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 16,
                                     "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"}),
    "phi3-spm": ("spm-phi3", {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"],
                              "tie_word_embeddings": False}),
}




def build_spm_tokenizer(out_dir: Path, add_prefix_space: bool = True, phi3_tokens: bool = False):
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import LlamaTokenizerFast

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, split_digits=True, num_threads=1, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=add_prefix_space, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    fast = LlamaTokenizerFast(vocab_file=str(out_dir / "tokenizer.model"), legacy=True, from_slow=True,
                              add_prefix_space=add_prefix_space, add_bos_token=True, add_eos_token=False)
    fast.chat_template = SPM_CHAT_TEMPLATE
    if phi3_tokens:
        fast.add_special_tokens({"additional_special_tokens": [
            AddedToken(text, rstrip=rstrip, lstrip=False, normalized=False, special=True)
            for text, rstrip in PHI3_ADDED_TOKENS]})
        fast.chat_template = PHI3_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(name: str, out_dir: Path) -> Path:
    """Write the tiny model `name` (a key of TINY_MODELS) to `out_dir` and return it."""
    kind, overrides = TINY_MODELS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        tokenizer = build_bpe_tokenizer(out_dir)
    else:  # Gemma's SentencePiece adds no leading "▁"; Llama 2's and Phi-3's do
        tokenizer = build_spm_tokenizer(out_dir, add_prefix_space=kind != "spm-no-prefix",
                                        phi3_tokens=kind == "spm-phi3")
    write_random_weights(out_dir, {**overrides}, tokenizer, seed=sum(map(ord, name)))
    return out_dir
