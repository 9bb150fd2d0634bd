"""What the server and router tests share: the tiny chat model they serve, opened under a chosen name, and a check
of what a llama.cpp grammar lets a model write."""

from __future__ import annotations

import ctypes
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import llama_cpp

from edgepack.serve.model import LocalModel, load

MODEL_ID = "tiny-chat"
CONTEXT = 256
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hello to the sea."}]


def wait_until(condition, seconds: float, message: str, poll_s: float = 0.02) -> None:
    """Poll `condition()` until it holds; fail with `message` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(poll_s)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def open_model(path: Path, model_id: str = MODEL_ID, cls: type[LocalModel] = LocalModel,
               context: int = CONTEXT, parallel: int = 1) -> LocalModel:
    """One generation at a time unless `parallel` says more, so tests of the queue know what runs."""
    loaded = load(path, context=context, parallel=parallel)
    return cls(loaded.runtime, model_id)


class GatedModel(LocalModel):
    """The real model, but each generation waits for `gate` before it starts and paces its tokens, so a test can
    hold the engine busy; what each generation ended with is recorded."""

    def __init__(self, runtime, model_id):
        super().__init__(runtime, model_id)
        self.gate = threading.Event()
        self.finished: list[tuple[str | None, int]] = []
        self.tokenized = 0  # prompts tokenized

    def prompt_ids(self, prompt=None, messages=None, tools=None, **bounds):
        self.tokenized += 1
        return super().prompt_ids(prompt, messages, tools, **bounds)

    def submit(self, *_):
        return False  # the server streams through stream_ids below

    def stream_ids(self, prompt_ids, options, cancel=None):
        self.gate.wait(30)
        made, reason = 0, None
        for chunk in super().stream_ids(prompt_ids, replace(options, ignore_eos=True), cancel):
            made += chunk.token_id is not None
            reason = chunk.finish_reason or reason
            time.sleep(0.02)
            yield chunk
        self.finished.append((reason, made))


def grammar_takes(llm: llama_cpp.Llama, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets the model write `text` token by token and then end there."""
    sampler = llama_cpp.llama_sampler_init_grammar(llama_cpp.llama_model_get_vocab(llm.model), grammar.encode(),
                                                   b"root")
    assert sampler, "llama.cpp did not parse the grammar"
    try:
        for token in llm.tokenize(text.encode(), add_bos=False, special=False) + [llm.token_eos()]:
            one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
            candidates = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            if one[0].logit == float("-inf"):
                return False
            if token != llm.token_eos():
                llama_cpp.llama_sampler_accept(sampler, token)  # only after the grammar allowed it
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)
