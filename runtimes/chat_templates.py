"""Chat templates for models that have none (base models, a student saved without one), by name or from a file.

`edgepack serve` and bundles use DEFAULT_CHAT_TEMPLATE when a model has no template and none was given, as
llama-server does, and /health says so. The templates are written for edgepack in the formats their names say.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.core.errors import EdgepackError

NAMED_CHAT_TEMPLATES: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n — the format most small chat models use
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"),
    # Llama 2 chat: [INST] user [/INST] answer, the system prompt inside the first instruction
    "llama2": (
        "{{ bos_token }}"
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' -%}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '[INST] ' + ('<<SYS>>\n' + system + '\n<</SYS>>\n\n' if loop.first and system else '') "
        "+ message['content'] + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + message['content'] + ' ' + eos_token }}{%- endif -%}"
        "{%- endfor -%}"),
    # plain text turns, for base models trained on prose: "User: ...\nAssistant: ..."
    "plain": (
        "{%- for message in messages -%}"
        "{{ message['role'] | capitalize }}: {{ message['content'] }}{{ '\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"),
}
DEFAULT_CHAT_TEMPLATE = "chatml"


def resolve_chat_template(name_or_file: str | Path) -> str:
    """The template a name (one of NAMED_CHAT_TEMPLATES) or a Jinja file stands for."""
    text = str(name_or_file)
    if text in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[text]
    path = Path(text)
    if path.is_file():
        template = path.read_text(encoding="utf-8")
        if "messages" not in template:
            raise EdgepackError(f"{path} does not look like a chat template (a Jinja template over `messages`)")
        return template
    raise EdgepackError(f"chat template {text!r}: not a file, nor one of the names "
                        f"{', '.join(sorted(NAMED_CHAT_TEMPLATES))}")
