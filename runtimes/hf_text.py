"""Text handling for engines that run beside a Hugging Face tokenizer (transformers and ONNX Runtime)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgepack.core.errors import EdgepackError


class HFTokenizerText:
    """tokenize / detokenize / apply_chat_template over `self.tokenizer` (a transformers tokenizer)."""

    tokenizer: object
    path: Path

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special, split_special_tokens=not parse_special)["input_ids"]

    def special_tokens(self) -> dict[int, str]:
        return {token_id: token.content for token_id, token in self.tokenizer.added_tokens_decoder.items()
                if token.special}

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    def chat_template_text(self) -> str | None:
        return self.tokenizer.chat_template or None

    def set_chat_template(self, template: str, source: str) -> None:
        self.tokenizer.chat_template, self.chat_template_source = template, source

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if not self.tokenizer.chat_template:
            raise EdgepackError(f"{self.path.name} has no chat template; use a plain prompt instead of chat")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  tools=tools)


def end_of_generation_ids(generation_config, config, tokenizer) -> frozenset[int]:
    """Every token that ends generation: generation_config's and config's eos ids, and the tokenizer's."""
    ids = set()
    for source in (generation_config, config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)
