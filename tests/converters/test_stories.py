"""Real weights: stories260K (from ../shared) through our converter, llama.cpp against transformers."""

from __future__ import annotations

import pytest
from native_generation import llama_cpp_greedy, transformers_greedy

from runtimes import llamacpp, torch_reference


@pytest.mark.parametrize("prompt", ["Once upon a time", "The little dog"])
def test_greedy_text_is_identical_in_llama_cpp_and_transformers(stories_dir, stories_variants, prompt):
    model, tokenizer = torch_reference.load_reference(stories_dir)
    prompt_ids = tokenizer(prompt)["input_ids"]
    expected = transformers_greedy(model, prompt_ids, 80, {tokenizer.eos_token_id})
    llm = llamacpp.open_gguf(stories_variants["gguf-f32"].path, n_ctx=256)
    got = llama_cpp_greedy(llm, prompt_ids, 80)
    assert len(expected) >= 40
    assert tokenizer.decode(got) == tokenizer.decode(expected)


def test_empty_prompt_continues_like_the_provenance_says(stories_variants):
    llm = llamacpp.open_gguf(stories_variants["gguf-f32"].path, n_ctx=128)
    text = llm.detokenize(llama_cpp_greedy(llm, [llm.token_bos()], 20)).decode()
    assert text.strip().startswith("Once upon a time, there was a little girl named Lily")


@pytest.mark.parametrize("kind", ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"])
def test_smaller_variants_load_and_tell_a_story(stories_variants, kind):
    llm = llamacpp.open_gguf(stories_variants[kind].path, n_ctx=128)
    produced = llama_cpp_greedy(llm, llamacpp.tokenize(llm, "Once upon a time", add_special=True), 30)
    text = llm.detokenize(produced).decode(errors="replace")
    assert len(produced) >= 10
    assert sum(ch.isalpha() for ch in text) > len(text) / 2  # words, not noise


def test_quantized_files_are_smaller(stories_variants):
    sizes = {kind: v.bytes for kind, v in stories_variants.items()}
    assert sizes["gguf-f32"] > sizes["gguf-f16"] > sizes["gguf-q8_0"] >= sizes["gguf-q4_k_m"]
