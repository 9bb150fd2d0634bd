"""Tiny random-weight models of every supported architecture, with real-style tokenizers built in code.

Hidden and feed-forward sizes are multiples of 256 so llama.cpp's K-quants really apply. Everything is seeded,
so the same call gives the same files. Tokenizers: a byte-level BPE with GPT-2's regex (like GPT-2, SmolLM,
Qwen) trained with `tokenizers`, and a SentencePiece BPE with byte fallback (like Llama 2, Gemma, Phi-3)
trained with `sentencepiece`, with ("spm") or without ("spm-no-prefix", as Gemma) a leading "▁".
"""

from __future__ import annotations

import io
from pathlib import Path

TRAINING_TEXT = """\
The lighthouse keeper counted the ships every evening, writing each name in a narrow blue notebook.
On Tuesday there were 12 fishing boats, 3 ferries and one old sailing yacht called Persistence.
"Will the storm reach us tonight?" asked the girl. "Not before midnight," her grandfather replied.
Shopping list: 2 loaves of bread, 500 g of flour, 6 eggs, a jar of honey, and 1.5 litres of milk.
def add(a, b):
    return a + b
for item in range(10):
    print(item * 2, end=" ")
The committee met at 09:30 on 2024-03-15 and approved a budget of 1,250,000 euros for the bridge.
Rivers carry sediment downstream; over thousands of years the deltas grow into wide green plains.
She said she'd finish the report, but they'll need more data, and we've run out of time again.
Café, naïve, résumé, Zürich, São Paulo, Kraków: names with accents appear in many languages.
Temperatures fell to -12 degrees; the thermometer read 10.5 at noon and 3.25 by the evening.
A small robot rolled across the kitchen floor, beeping softly as it searched for crumbs to collect.
"""

SPECIAL_BPE_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
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

BASE_CONFIG = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "initializer_range": 0.08,  # larger than usual so logits are decisive, not near-uniform
    "dtype": "float32",
}


def build_bpe_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL_BPE_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token=None, pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


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
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, overrides = TINY_MODELS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        tokenizer = build_bpe_tokenizer(out_dir)
    else:  # Gemma's SentencePiece adds no leading "▁"; Llama 2's and Phi-3's do
        tokenizer = build_spm_tokenizer(out_dir, add_prefix_space=kind != "spm-no-prefix",
                                        phi3_tokens=kind == "spm-phi3")
    settings = {**BASE_CONFIG, **overrides, "vocab_size": len(tokenizer)}
    model_type = settings.pop("model_type")
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(model_type, **settings, **special)
    torch.manual_seed(sum(map(ord, name)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norm weights too, so an offset or permutation mistake cannot hide
        for param_name, param in model.named_parameters():
            if "norm" in param_name:  # gemma stores norms as (w - 1), the others as w
                param.copy_(torch.randn_like(param) * 0.1 + (0.0 if model_type == "gemma3_text" else 1.0))
            elif param.dim() == 1:
                param.copy_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
