"""The runtime protocol every engine implements, and the generation loop they share.

An engine supplies a few primitives (tokenize, detokenize, chat template, logits of a sequence, and a decode
session: `_prefill(prompt_ids)` then `_step(token_id)`, each returning next-token logits). Stop strings, EOS, the
length limit and UTF-8-safe streaming (runtimes.token_stream) are written once; so is the generation loop with Python
sampling here, which llama.cpp replaces with its batch scheduler and its own sampler chains. The types that pass
between callers and engines are in runtimes.generation_types.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgepack.core.errors import EdgepackError
from runtimes.chat_prompt import chat_prompt_pieces
from runtimes.generation_types import (  # noqa: F401 (the engines' callers take these from here)
    DEVICES,
    Device,
    GenerationChunk,
    GenerationOptions,
    GenerationResult,
    LoadOptions,
)
from runtimes.prompt_tokens import pieces_of_text, special_pattern, tokenize_in_runs
from runtimes.sampling import token_logprobs
from runtimes.token_stream import TokenPicker, TokenStream

DEFAULT_CONTEXT_CAP = 4096


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


class Runtime(ABC):
    """One loaded variant on one engine."""

    name: ClassVar[str]
    # generate() may be called from many threads at once: the engine queues (and batches) them itself
    generates_concurrently: ClassVar[bool] = False
    constrains_output: ClassVar[bool] = False  # GenerationOptions.grammar is honoured
    # what to do about it where it is not
    unconstrained_remedy: ClassVar[str] = "serve a GGUF variant (llama.cpp) for that"
    parallel: int = 1  # generations the engine runs at once
    path: Path
    context_length: int
    eos_token_ids: frozenset[int]
    device: str  # where it runs, in the engine's own words

    # -- what each engine implements -----------------------------------------------------------

    @classmethod
    @abstractmethod
    def can_load(cls, path: Path) -> bool:
        """Whether `path` is a variant this engine runs."""

    @classmethod
    def supports_device(cls, device: str) -> bool:
        """Whether this installation of the engine can run a model on `device` (cpu, cuda, metal)."""
        return device == "cpu"

    @abstractmethod
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """`add_special`: the BOS (or other tokens) the model puts first; `parse_special`: whether special-token text
        in `text` (such as "<|im_end|>") becomes those tokens."""

    chat_template_source: str = "model"  # where the chat template in use came from: model, given, or default

    def chat_template_text(self) -> str | None:
        """The chat template in use (Jinja): the model's own unless another was set; None when there is none."""
        return None

    def set_chat_template(self, template: str, source: str) -> None:
        """Use `template` for chat from now on (for a model without one, or to replace its own)."""
        raise EdgepackError(f"the {self.name} engine cannot take another chat template")

    def special_tokens(self) -> dict[int, str]:
        """The engine's special (control) tokens, id -> text: what a chat template writes as markers."""
        return {}

    @abstractmethod
    def detokenize(self, token_ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (part of a UTF-8 character, for some)."""
        return self.detokenize([token_id]).encode("utf-8")

    def vocab_size(self) -> int | None:
        """Token ids are below this (None where the engine cannot tell)."""
        return None

    @abstractmethod
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The model's chat template applied; `tools` (OpenAI's function specs) for templates that take them."""

    @abstractmethod
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of `token_ids`, shape [len, vocab], float32."""

    def logits_from(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Logits at positions `start`.. of `token_ids`, shape [len - start, vocab]. Engines may compute only those
        rows, and reuse what they kept of a previous call's shared prefix (many scoring calls share one)."""
        return self.logits(token_ids)[start:]

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes the engine holds for this model: weights plus its KV cache."""

    def _prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Start a fresh decode session on `prompt_ids`; the logits for the next token. (For the shared loop in
        `generate`; an engine that generates its own way, as llama.cpp's batch scheduler does, needs neither.)"""
        raise NotImplementedError(f"the {self.name} engine has no single-sequence decode session")

    def _step(self, token_id: int) -> np.ndarray:
        """Append one token to the session; the logits for the next token."""
        raise NotImplementedError(f"the {self.name} engine has no single-sequence decode session")

    def close(self) -> None:  # noqa: B027 (optional hook: most engines free on garbage collection)
        """Release what the engine holds."""

    # -- shared behaviour ------------------------------------------------------------------------

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None, limit: int | None = None,
                        cancel: threading.Event | None = None) -> list[int]:
        """The template writes its own special tokens (BOS included where the model wants it); no client string
        (a message's text, a tool call's name or arguments, a tool's description) ever becomes a special token
        (runtimes.chat_prompt). Tokenized a run at a time (runtimes.prompt_tokens): PromptTooLong past `limit`
        tokens, PromptCancelled once `cancel` is set."""
        specials = self.special_tokens()
        try:
            pieces = chat_prompt_pieces(self._render_chat, messages, specials.values(), tools)
        except EdgepackError:
            raise
        except Exception as exc:  # the template's own raise_exception(...), or an error inside the template
            raise EdgepackError(f"the model's chat template refused these messages: {exc}") from exc
        return tokenize_in_runs(self.tokenize, pieces, self._special_ids, self._special_pattern,
                                add_special=False, limit=limit, cancel=cancel)

    def _render_chat(self, messages: list[dict], tools: list[dict] | None) -> str:
        return self.apply_chat_template(messages, tools=tools) if tools else self.apply_chat_template(messages)

    def prompt_ids(self, text: str, limit: int | None = None, cancel: threading.Event | None = None) -> list[int]:
        """A raw prompt's tokens (special-token text in it parsed, BOS first where the model wants it), tokenized a
        run at a time like a chat prompt."""
        pieces = pieces_of_text(text, self._special_pattern)
        return tokenize_in_runs(self.tokenize, pieces, self._special_ids, None, add_special=True, limit=limit,
                                cancel=cancel)

    # read once (each walks the vocabulary or its special tokens); two threads may both compute one, harmlessly
    @functools.cached_property
    def _special_ids(self) -> dict[str, int]:
        return {text: token for token, text in self.special_tokens().items()}

    @functools.cached_property
    def _special_pattern(self):
        return special_pattern(list(self.special_tokens().values()))

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """The most characters one token stands for (a prompt longer than this many per context position cannot
        fit): its bytes, an upper bound; 64 where the engine cannot tell its vocabulary's size."""
        size = self.vocab_size()
        return max((len(self.token_bytes(token)) for token in range(size)), default=0) or 64 if size else 64

    def check_prompt_fits(self, prompt_ids: Sequence[int], max_tokens: int = 0) -> None:
        """Refuse an empty prompt, or one that with `max_tokens` more would not fit the context."""
        if len(prompt_ids) == 0:
            raise EdgepackError("the prompt is empty after tokenization; give at least one token")
        if len(prompt_ids) + max_tokens > self.context_length:
            raise EdgepackError(
                f"the prompt has {len(prompt_ids)} tokens and {max_tokens} more were asked for, but the context is "
                f"{self.context_length} tokens; shorten the prompt or ask for fewer tokens")

    def generate(self, prompt: str | Sequence[int], options: GenerationOptions | None = None,
                 cancel: threading.Event | None = None) -> Iterator[GenerationChunk]:
        """Stream the continuation of `prompt` (text, tokenized with special tokens, or token ids)."""
        options = options or GenerationOptions()
        prompt_ids = list(self.tokenize(prompt) if isinstance(prompt, str) else prompt)
        self.check_prompt_fits(prompt_ids, 1)  # room for at least one new token
        picker = TokenPicker(options, self.output_grammar(options.grammar))
        stream = TokenStream(prompt_ids, options, self.eos_token_ids, self.detokenize, self.context_length)
        try:
            logits = self._prefill(prompt_ids)
            while True:
                if cancel is not None and cancel.is_set():
                    yield stream.cancelled()
                    return
                token = picker.pick(logits)
                logprob, top = token_logprobs(logits, token, options.top_logprobs) if options.logprobs else (None, ())
                chunk = stream.add(token, logprob, top)
                yield chunk
                if chunk.finish_reason is not None:
                    return
                logits = self._step(token)
        finally:
            picker.close()

    def output_grammar(self, grammar: str | None):
        """The grammar (runtimes.llamacpp_sampling.OutputGrammar) that constrains a generation's tokens, None for
        free text. Engines whose `constrains_output` is set build it; the others refuse."""
        if grammar is None:
            return None
        raise EdgepackError(f"the {self.name} engine cannot constrain output to a grammar (response_format, "
                            f"forced tool calls) here; {self.unconstrained_remedy}")

    def check_output_grammar(self, grammar: str) -> None:
        """Compile `grammar` once against this engine's vocabulary and free it, before a request is admitted: an
        EdgepackError with a short reason where it cannot be used (llama.cpp refuses it, or the engine has no
        grammars)."""
        compiled = self.output_grammar(grammar)
        if compiled is not None:
            compiled.close()

    def complete(self, prompt: str | Sequence[int], options: GenerationOptions | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Generate to the end and collect the stream."""
        options = options or GenerationOptions()
        prompt_ids = list(self.tokenize(prompt) if isinstance(prompt, str) else prompt)
        texts, tokens, logprobs = [], [], []
        reason = "length"
        for chunk in self.generate(prompt_ids, options, cancel):
            texts.append(chunk.text)
            if chunk.token_id is not None and (chunk.finish_reason is None or chunk.token_id not in
                                                self.eos_token_ids):
                tokens.append(chunk.token_id)
                if chunk.logprob is not None:
                    logprobs.append(chunk.logprob)
            reason = chunk.finish_reason or reason
        return GenerationResult(text="".join(texts), token_ids=tuple(tokens),
                                logprobs=tuple(logprobs) if options.logprobs else None, finish_reason=reason,
                                prompt_tokens=len(prompt_ids), completion_tokens=len(tokens))

    def complete_all(self, prompts: Sequence[Sequence[int]], options: Sequence[GenerationOptions],
                     on_done: Callable[[], None] | None = None) -> list[GenerationResult]:
        """Each prompt completed with its options, in order: `parallel` at a time on an engine that batches them
        (each generation as it would be served beside others), one after another on the others. `on_done` is
        called as each one finishes (from the worker threads, where the engine batches)."""
        def one(prompt: Sequence[int], option: GenerationOptions) -> GenerationResult:
            result = self.complete(list(prompt), option)
            if on_done is not None:
                on_done()
            return result

        if not self.generates_concurrently or self.parallel < 2 or len(prompts) < 2:
            return [one(prompt, option) for prompt, option in zip(prompts, options, strict=True)]
        from concurrent.futures import ThreadPoolExecutor

        if len(prompts) != len(options):
            raise ValueError(f"{len(prompts)} prompts but {len(options)} options")
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="edgepack-complete") as pool:
            return list(pool.map(one, prompts, options))
