"""A fixed probe text that exercises what tokenizers disagree on.

It mixes scripts, code, digits, runs of spaces, tabs and newlines (one longer than any whitespace token we
know of), HTML tags, contractions, emoji and accents. The tokenizer parity check encodes it with both the
Hugging Face tokenizer and llama.cpp; the BPE pre-tokenizer is identified by how it splits this text.
"""

PROBE_TEXT = (
    "Hello world! It's a test: we'll see, they're sure, I'd say, you've won, he's done.\n"
    "   three leading spaces,\ttab\t\ttabs, and trailing spaces   \n\n\n"
    "Numbers: 7 42 123 4567 89012 3.14159 1,000,000 -273.15 0x1F 1e-9 2026-11-28\n"
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    "for (int i = 0; i < 10; ++i) { total += values[i] * 2; }  // sum\n"
    "Français: déjà vu, naïve, cœur. Deutsch: Größe, Straße. Español: ¿Qué tal? ¡Olé!\n"
    "Русский текст, Ελληνικά, עברית, العربية, हिन्दी, 中文字符测试, 日本語のテキスト, 한국어 문장.\n"
    "Emoji 🙂🚀👍🏽 and symbols: ©®™ ∑ √ ∞ ≠ ≤ → ← «quotes» “curly” ‘single’ — – …\n"
    "MixedCASE camelCase snake_case kebab-case ALLCAPS aBc123def ...!!!??? $$$ %%% @@@\n"
    "<h1>Title</h1>\n\n\n\n<table><tr><td>a  b</td><td>    c</td></tr></table>\t\t\t\tend" + " " * 40 + "gap\n"
    "ááá\u00a0nbsp\u2009thin\u3000ideographic\r\nwindows newline end."
)

# A conversation rendered through the model's chat template, when it has one, and appended to the probe so
# the template's special tokens are checked too.
PROBE_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And in words?"},
]
