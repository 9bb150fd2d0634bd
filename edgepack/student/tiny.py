"""A tiny random-weight student, built in code: a byte-level BPE tokenizer (GPT-2's regex, ChatML special tokens)
trained on a built-in text, and a 2-layer model with random weights. `edgepack doctor` runs every engine on it, and
the tests build one of every architecture from the same parts (tests/synth_models.py).

Hidden and feed-forward sizes are multiples of 256 so llama.cpp's K-quants really apply. Everything is seeded,
so the same call gives the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def write_random_weights(out_dir: Path, overrides: dict[str, Any], tokenizer, seed: int) -> None:
    """A model of `overrides["model_type"]` with BASE_CONFIG's sizes and random weights, saved as safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**BASE_CONFIG, **overrides, "vocab_size": len(tokenizer)}
    model_type = settings.pop("model_type")
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(model_type, **settings, **special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norm weights too, so an offset or permutation mistake cannot hide
        for param_name, param in model.named_parameters():
            if "norm" in param_name:  # gemma stores norms as (w - 1), the others as w
                param.copy_(torch.randn_like(param) * 0.1 + (0.0 if model_type == "gemma3_text" else 1.0))
            elif param.dim() == 1:
                param.copy_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out_dir, safe_serialization=True)


def write_tiny_llama(out_dir: Path) -> Path:
    """The built-in tiny student: a Llama with the BPE tokenizer and a ChatML template."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_bpe_tokenizer(out_dir)
    write_random_weights(out_dir, {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                   "tie_word_embeddings": True}, tokenizer, seed=sum(map(ord, "llama-bpe")))
    return out_dir
