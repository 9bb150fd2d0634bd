"""Tiny random-weight models of every supported architecture, with real-style tokenizers built in code.

Hidden and feed-forward sizes are multiples of 256 so llama.cpp's K-quants really apply. Everything is seeded,
so the same call gives the same files. Tokenizers: a byte-level BPE with GPT-2's regex (like GPT-2, SmolLM,
Qwen) trained with `tokenizers`, and a SentencePiece BPE with byte fallback (like Llama 2, Phi-3) trained with
`sentencepiece` with a leading "▁"; Gemma 3's ("spm-gemma") has none, and has Gemma's user-defined pieces.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

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
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' "
    "else message['role']) + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Gemma 3's SentencePiece model has ~6,400 user-defined pieces, each matched whole before any merging: the chat
# markers (its Hugging Face tokenizer marks them special), runs of newlines, spaces ("▁" runs: SentencePiece
# escapes spaces first) and tabs, and HTML tags. Ours has the same kinds, runs as long as Gemma's.
HTML_TAGS = ("a", "b", "i", "u", "s", "q", "p", "em", "strong", "code", "pre", "span", "div", "h1", "h2", "h3",
             "h4", "h5", "h6", "ul", "ol", "li", "dl", "dt", "dd", "table", "thead", "tbody", "tfoot", "tr", "td", "th",
             "caption", "colgroup", "col", "blockquote", "sup", "sub", "small", "big", "mark", "del", "ins", "kbd",
             "samp", "var", "cite", "abbr", "dfn", "time", "section", "article", "header", "footer", "nav", "main",
             "aside", "details", "summary", "dialog", "figure", "figcaption", "form", "fieldset", "legend", "label",
             "input", "button", "select", "option", "optgroup", "textarea", "output", "progress", "meter", "script",
             "noscript", "style", "title", "head", "body", "html", "img", "picture", "video", "audio", "source",
             "canvas", "svg", "iframe", "object", "center", "font", "address", "menu", "template")
GEMMA_CHAT_MARKERS = ("<start_of_turn>", "<end_of_turn>")
GEMMA_SPACE_RUNS = tuple("\u2581" * n for n in range(2, 32))
GEMMA_USER_DEFINED = (*GEMMA_CHAT_MARKERS, *("\n" * n for n in range(1, 32)), *GEMMA_SPACE_RUNS,
                      *("\t" * n for n in range(1, 32)), *(f"<{tag}>" for tag in HTML_TAGS),
                      *(f"</{tag}>" for tag in HTML_TAGS), "<br>", "<hr>", "<br/>")

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
    "gemma3-spm": ("spm-gemma", {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
                                 "head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 16,
                                 "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"}),
    "phi3-spm": ("spm-phi3", {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"],
                              "tie_word_embeddings": False}),
}




def train_sentencepiece(add_prefix_space: bool, **options: Any) -> bytes:
    """A SentencePiece BPE with byte fallback trained on the built-in text: tokenizer.model's bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    user_defined = options.get("user_defined_symbols", ())
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()), model_writer=model, model_type="bpe",
        vocab_size=400 + len(user_defined), byte_fallback=True, character_coverage=1.0, split_digits=True,
        num_threads=1, minloglevel=2, add_dummy_prefix=add_prefix_space, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, **options)
    return model.getvalue()


def build_spm_tokenizer(out_dir: Path, phi3_tokens: bool = False):
    from tokenizers import AddedToken
    from transformers import LlamaTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (out_dir / "tokenizer.model").write_bytes(model)
    fast = LlamaTokenizerFast(vocab_file=str(out_dir / "tokenizer.model"), legacy=True, from_slow=True,
                              add_prefix_space=True, add_bos_token=True, add_eos_token=False)
    fast.chat_template = SPM_CHAT_TEMPLATE
    if phi3_tokens:
        fast.add_special_tokens({"additional_special_tokens": [
            AddedToken(text, rstrip=rstrip, lstrip=False, normalized=False, special=True)
            for text, rstrip in PHI3_ADDED_TOKENS]})
        fast.chat_template = PHI3_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_gemma_tokenizer(out_dir: Path):
    """Gemma 3's layout: <pad> <eos> <bos> <unk>, then the user-defined pieces; no leading "▁"."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken
    from transformers import GemmaTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(train_sentencepiece(
        False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=list(GEMMA_USER_DEFINED)))
    # SentencePiece never builds a user-defined piece by merging, so their scores are free; Gemma 3's are low
    # enough that score-driven merging splits "   three" as "  " + " three" (what llama.cpp did with the real
    # checkpoint while its whitespace pieces kept their "▁"), so ours are the lowest of all.
    lowest = min(piece.score for piece in proto.pieces) - 1
    for piece in proto.pieces:
        if piece.type == piece.USER_DEFINED:
            piece.score = lowest
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    fast = GemmaTokenizerFast(vocab_file=str(out_dir / "tokenizer.model"), from_slow=True)
    # transformers' conversion matches added tokens in the raw text, where a "▁" run never occurs; SentencePiece
    # matches them after escaping spaces, so these match after normalization (the ids stay the same)
    fast.backend_tokenizer.add_tokens([AddedToken(run, normalized=True, special=False) for run in GEMMA_SPACE_RUNS])
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(name: str, out_dir: Path) -> Path:
    """Write the tiny model `name` (a key of TINY_MODELS) to `out_dir` and return it."""
    kind, overrides = TINY_MODELS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        tokenizer = build_bpe_tokenizer(out_dir)
    elif kind == "spm-gemma":
        tokenizer = build_gemma_tokenizer(out_dir)
    else:
        tokenizer = build_spm_tokenizer(out_dir, phi3_tokens=kind == "spm-phi3")
    write_random_weights(out_dir, {**overrides}, tokenizer, seed=sum(map(ord, name)))
    return out_dir

# A chat template that takes tools, written for edgepack's tests in the Hermes way (tools listed as JSON in the
# system turn, calls as <tool_call>{...}</tool_call>, results in <tool_response> inside a user turn), with ChatML
# markers; written with explicit whitespace so trim_blocks/lstrip_blocks do not change it.
TOOLS_CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\n\n' }}{%- endif -%}"
    "{{ 'You may call functions. They are described as JSON inside <tools></tools>:\n<tools>\n' }}"
    "{%- for tool in tools -%}{{ tool | tojson }}{{ '\n' }}{%- endfor -%}"
    "{{ '</tools>\nTo call one, answer with <tool_call>\n{\"name\": <name>, \"arguments\": <object>}\n"
    "</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' -%}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- if message['content'] -%}{{ message['content'] + '\n' }}{%- endif -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{ call['function']['arguments'] | tojson }}{{ '}\n</tool_call>\n' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def with_chat_template(model_dir: Path, out_dir: Path, template: str) -> Path:
    """A copy of a tiny model's folder whose tokenizer has `template` as its chat template."""
    import json
    import shutil

    shutil.copytree(model_dir, out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)  # transformers reads the template from chat_template.jinja
    config_path.write_text(json.dumps(config, indent=2))
    (out_dir / "chat_template.jinja").write_text(template)
    return out_dir
