"""The batch schedulers of llama.cpp and of our ONNX graph: several generations in one decode, each isolated from the
others, the prefix cache, chunked prompts that do not stall running streams, cancellation, seeds, grammars, and
sampling in llama.cpp's chain checked against the Python sampler (an independent implementation of the same
options)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from runtimes.base import GenerationOptions, LoadOptions
from runtimes.registry import open_runtime
from runtimes.sampling import Sampler

PROMPTS = ["The robot rolled", "A small boat", "Under the old bridge there", "She opened the"]
GREEDY = GenerationOptions(max_tokens=24, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module", params=["llamacpp", "onnxrt"])
def variant(request):
    """The same tiny llama for each batching engine: a GGUF F32 and our ONNX graph in float32."""
    return request.getfixturevalue("tiny_gguf" if request.param == "llamacpp" else "tiny_onnx")


@pytest.fixture(scope="module")
def batched(variant):
    runtime = open_runtime(variant, LoadOptions(context_length=256, parallel=4))
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def alone(variant):
    runtime = open_runtime(variant, LoadOptions(context_length=256, parallel=1))
    yield runtime
    runtime.close()


def run_concurrently(runtime, prompts, options):
    results = [None] * len(prompts)

    def one(index: int) -> None:
        results[index] = runtime.complete(prompts[index], options)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def teacher_forced_logprobs(runtime, prompt: str, token_ids) -> np.ndarray:
    """Each generated token's log-probability from one plain forward pass over prompt + tokens (no batching)."""
    prompt_ids = runtime.tokenize(prompt)
    logits = runtime.logits_from(prompt_ids + list(token_ids), len(prompt_ids) - 1)[: len(token_ids)]
    shifted = logits - logits.max(axis=1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return logprobs[np.arange(len(token_ids)), token_ids]


def test_sequences_decoded_together_stay_isolated(batched, alone):
    """Four prompts in one batch: each answer is what the model gives that prompt alone, and every token's
    log-probability is what a plain forward pass over that sequence alone gives (another sequence's tokens in
    its attention would move them by far more than the tolerance)."""
    together = run_concurrently(batched, PROMPTS, GREEDY)
    assert batched.scheduler().counters.steps < 4 * GREEDY.max_tokens  # they really shared decode steps
    for prompt, result in zip(PROMPTS, together, strict=True):
        assert len(result.token_ids) == GREEDY.max_tokens
        expected = teacher_forced_logprobs(alone, prompt, result.token_ids)
        np.testing.assert_allclose(result.logprobs, expected, atol=2e-3)
        assert result.token_ids == alone.complete(prompt, GREEDY).token_ids


def test_a_follow_up_reuses_the_cached_prefix_and_answers_the_same(batched, alone):
    counters = batched.scheduler().counters
    first = batched.complete(PROMPTS[2], GenerationOptions(max_tokens=8, ignore_eos=True))
    follow_up = batched.tokenize(PROMPTS[2]) + list(first.token_ids) + batched.tokenize(" and then", False)
    before = counters.reused_tokens
    warm = batched.complete(follow_up, GREEDY)
    # everything but the last prompt token came from the cache: the first answer's prompt and its tokens but the last
    # one sampled (never read back), which the follow-up's prompt holds at the same place
    assert counters.reused_tokens - before == len(batched.tokenize(PROMPTS[2])) + len(first.token_ids) - 1
    assert warm.token_ids == alone.complete(follow_up, GREEDY).token_ids


def test_a_long_prompt_is_read_in_chunks_between_decode_steps(variant):
    runtime = open_runtime(variant, LoadOptions(context_length=512, parallel=2))
    try:
        scheduler = runtime.scheduler()
        scheduler.prefill_chunk = 32
        events: list[str] = []
        first_done = threading.Event()
        long_started = threading.Event()

        def record(name: str, done: threading.Event):
            def emit(chunk):
                if not isinstance(chunk, BaseException):
                    events.append(name)
                    if name == "long":
                        long_started.set()
                if isinstance(chunk, BaseException) or chunk.finish_reason is not None:
                    done.set()
            return emit

        short_done, long_done = threading.Event(), threading.Event()
        scheduler.submit(runtime.tokenize("The robot rolled"), GenerationOptions(max_tokens=60, ignore_eos=True),
                         record("short", short_done))
        while "short" not in events:
            first_done.wait(0.005)
        long_prompt = list(range(10, 10 + 320))  # 320 tokens: 10 chunks of 32 while the short one decodes
        scheduler.submit(long_prompt, GenerationOptions(max_tokens=4, ignore_eos=True), record("long", long_done))
        assert long_done.wait(60) and short_done.wait(60)
        made_while_long_prompt_was_read = events[: events.index("long")].count("short")
        assert made_while_long_prompt_was_read >= 320 // 32 - 1  # one short token per chunk step, at least
    finally:
        runtime.close()


def test_cancelling_one_stream_leaves_the_others_untouched(batched, alone):
    cancel = threading.Event()
    results = {}

    def cancelled_one() -> None:
        made = []
        for chunk in batched.generate(PROMPTS[0], GenerationOptions(max_tokens=200, ignore_eos=True), cancel):
            made.append(chunk)
            if len(made) == 3:
                cancel.set()
        results["cancelled"] = made

    thread = threading.Thread(target=cancelled_one)
    thread.start()
    other = batched.complete(PROMPTS[1], GREEDY)
    thread.join(30)
    assert results["cancelled"][-1].finish_reason == "cancelled"
    assert sum(c.token_id is not None for c in results["cancelled"]) == 3
    assert other.token_ids == alone.complete(PROMPTS[1], GREEDY).token_ids


def test_seeds_reproduce_and_differ(batched):
    """A seed gives the same answer again. (Only under the same batching: decoded beside other sequences, the logits
    move in the last digits, which can tip a sampled token; llama.cpp's own server behaves the same.)"""
    sampled = GenerationOptions(max_tokens=24, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    first = batched.complete(PROMPTS[0], sampled)
    assert batched.complete(PROMPTS[0], sampled).token_ids == first.token_ids
    others = {batched.complete(PROMPTS[0], GenerationOptions(max_tokens=24, temperature=0.9, seed=seed,
                                                             ignore_eos=True)).token_ids for seed in range(5)}
    assert len(others) > 1


def test_bias_and_penalties_in_llama_cpp_match_the_python_sampler(alone):
    """Greedy with a logit bias and OpenAI's frequency and presence penalties: llama.cpp's sampler chain picks the
    tokens that the Python sampler picks from the model's plain logits step by step."""
    if alone.name != "llamacpp":
        pytest.skip("the ONNX engine samples with the Python sampler itself")
    favoured = alone.tokenize(" sea", add_special=False)[0]
    options = GenerationOptions(max_tokens=20, ignore_eos=True, logit_bias=((favoured, 12.0),),
                                frequency_penalty=1.5, presence_penalty=0.5)
    made = alone.complete(PROMPTS[0], options).token_ids
    prompt_ids = alone.tokenize(PROMPTS[0])
    reference = Sampler(logit_bias=options.logit_bias, frequency_penalty=1.5, presence_penalty=0.5)
    expected: list[int] = []
    for _ in range(options.max_tokens):
        logits = alone.logits_from(prompt_ids + expected, len(prompt_ids) + len(expected) - 1)[-1]
        token = reference.pick(logits)
        reference.accept(token)
        expected.append(token)
    assert list(made) == expected
    assert 2 <= made.count(favoured) < 20  # favoured at first, then held back by the penalties


# The tiny model has random weights: free-text strings would be random bytes, not always whole UTF-8 characters, so
# strings here are enums (benchmarks.server checks free text on the demo student)
SCHEMAS = [
    {"type": "object", "properties": {"size": {"enum": ["S", "M", "L"]}, "count": {"type": "integer"}},
     "required": ["size", "count"]},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["colour", "ok"]},
    {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
     "required": ["ids"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}}, "required": ["point"]},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["enum-and-integer", "enum-and-boolean", "array", "nested"])
def test_grammar_constrained_output_parses_and_validates(batched, schema):
    jsonschema = pytest.importorskip("jsonschema")
    from edgepack.serve.structured import json_grammar

    for seed in range(3):
        options = GenerationOptions(max_tokens=200, temperature=1.0, seed=seed, grammar=json_grammar(schema))
        result = batched.complete("Answer in JSON:", options)
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)


def test_a_prefix_shared_with_a_running_sequence_is_copied_not_recomputed(batched, alone):
    """A second user with the same long system prompt while the first is still generating: the new slot takes a copy
    of the running sequence's cache, cut after the shared part, and answers as it would have alone."""
    shared = list(range(20, 120))  # a 100-token "system prompt" that no earlier test's prompt starts with
    first, second = shared + [7, 8, 9], shared + [11, 12]
    counters = batched.scheduler().counters
    started = threading.Event()
    results = {}

    def long_running() -> None:
        for _chunk in batched.generate(first, GenerationOptions(max_tokens=60, ignore_eos=True)):
            started.set()
        results["first"] = True

    thread = threading.Thread(target=long_running)
    thread.start()
    assert started.wait(30)
    before = counters.reused_tokens
    answer = batched.complete(second, GREEDY)
    thread.join(30)
    assert counters.reused_tokens - before == len(shared)
    assert answer.token_ids == alone.complete(second, GREEDY).token_ids


def test_an_onnx_folder_without_its_grammar_vocabulary_refuses_grammars(tiny_onnx, tmp_path):
    """tokenizer.gguf is what the ONNX engine's grammars work on: without it (a folder from before it was written),
    a grammar is refused with a clear error instead of being ignored."""
    import shutil

    from edgepack.core.errors import EdgepackError
    from edgepack.core.onnx_folder import GRAMMAR_VOCAB_FILE

    folder = shutil.copytree(tiny_onnx, tmp_path / "onnx-fp32")
    (folder / GRAMMAR_VOCAB_FILE).unlink()
    runtime = open_runtime(folder, LoadOptions(context_length=64))
    try:
        assert not runtime.constrains_output
        with pytest.raises(EdgepackError, match=r"cannot constrain output to a grammar.*no tokenizer\.gguf"):
            runtime.complete("Answer in JSON:", GenerationOptions(max_tokens=8, grammar='root ::= "yes" | "no"'))
        assert runtime.complete("Answer:", GenerationOptions(max_tokens=4, ignore_eos=True)).completion_tokens == 4
    finally:
        runtime.close()


def test_without_llama_cpp_python_the_onnx_engine_says_what_to_install_for_grammars(tiny_onnx, monkeypatch):
    """An ONNX bundle installed from its offline wheelhouse has no llama-cpp-python: grammars are then refused with
    what to install, and everything else works."""
    import importlib.util

    from edgepack.core.errors import EdgepackError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    runtime = open_runtime(tiny_onnx, LoadOptions(context_length=64))
    try:
        assert not runtime.constrains_output
        with pytest.raises(EdgepackError, match="install llama-cpp-python"):
            runtime.complete("Answer:", GenerationOptions(max_tokens=8, grammar='root ::= "yes" | "no"'))
        assert runtime.complete("Answer:", GenerationOptions(max_tokens=4, ignore_eos=True)).completion_tokens == 4
    finally:
        runtime.close()
