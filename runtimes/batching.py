"""Continuous batching, the part every engine shares: several generations decode together, one token each per
forward pass. On a CPU, decoding one token is bound by reading the weights; a batch of four sequences reads them
once for four tokens.

A scheduler owns N sequences (slots, each with a KV cache of its own) and runs on a thread of its own: callers
submit (prompt ids, options) and get the chunks of their generation back, first come first served, cancellable.
An engine subclass (runtimes.llamacpp_batch, runtimes.onnx_batch) says how a step is computed, how a slot's KV cache
is copied or cut, and how a token is picked.

Prefix cache: a finished sequence keeps its KV. A new request takes the idle slot whose cached tokens share the
longest prefix with its prompt and reads only the rest; when a running or other idle sequence shares a longer
prefix, its cache is copied into the new slot and cut after the shared part (a memory copy, far cheaper than
reading the prefix again). The last prompt token is always read again, for its logits.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgepack.core.errors import EdgepackError
from runtimes.base import GenerationChunk, GenerationOptions
from runtimes.token_stream import TokenStream

Emit = Callable[[GenerationChunk | BaseException], None]
# While other sequences decode, a prompt is read at most this many tokens a step: on a 2-core CPU a step of 128
# prompt tokens takes ~0.4 s on llama.cpp, the longest pause a running stream then sees (256 would double it;
# smaller chunks make a long prompt's first token later)
DEFAULT_PREFILL_CHUNK = 128


@dataclass
class Request:
    prompt_ids: list[int]
    options: GenerationOptions
    emit: Emit  # gets each chunk (the last has a finish_reason) or the exception that ended the generation
    cancel: threading.Event | None


@dataclass
class Slot:
    index: int  # the engine's sequence: llama.cpp's seq_id, a row of the ONNX KV buffers
    cached: list[int] = field(default_factory=list)  # the tokens whose KV this sequence holds, from position 0
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to read
    next_token: int | None = None  # sampled, to be read next step
    sampler: Any = None  # what picks this generation's tokens (the engine's), closed when it ends
    stream: TokenStream | None = None
    last_used: float = 0.0
    admitted: int = 0  # admission order: prompts are read first come, first served

    @property
    def running(self) -> bool:
        return self.request is not None


class SequenceSampler:
    """A slot's sampler (the engine's), so that an exception while picking one sequence's token ends that sequence
    only: the step goes on for the others, and `_deliver` ends this one with `error` (a grammar that allows no token
    raises OutputConstraintError). The engine's state is fine: it is the sampler's state that went wrong."""

    def __init__(self, sampler: Any) -> None:
        self.sampler, self.error = sampler, None

    def sample(self, *args: Any) -> int:  # llama.cpp's SamplerChain
        return self._guarded(self.sampler.sample, args)

    def pick(self, *args: Any) -> int:  # the Python TokenPicker
        return self._guarded(self.sampler.pick, args)

    def _guarded(self, pick: Callable[..., int], args: tuple) -> int:
        try:
            return pick(*args)
        except Exception as exc:
            self.error = exc
            return 0  # stands in until `_deliver`, which ends the sequence instead

    def close(self) -> None:
        self.sampler.close()


@dataclass
class BatchCounters:
    reused_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed
    steps: int = 0  # forward passes


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class SequenceScheduler(ABC):
    """Generations from many threads on one engine with `slots` sequences."""

    def __init__(self, runtime, slots: int) -> None:
        self.runtime = runtime
        self.slots = [Slot(index) for index in range(slots)]
        self.counters = BatchCounters()
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._admissions = 0
        self._thread = threading.Thread(target=self._run, name="edgepack-batch", daemon=True)
        self._thread.start()

    # -- what an engine implements ----------------------------------------------------------------

    @abstractmethod
    def _step(self) -> None:
        """One forward pass: a token for every decoding slot and prompt tokens of admitted ones; then each slot
        whose logits came out gets its token (`_deliver`)."""

    @abstractmethod
    def _new_sampler(self, request: Request):
        """What picks the tokens of `request` (has close())."""

    @abstractmethod
    def _copy_cache(self, donor: Slot, slot: Slot, length: int) -> None:
        """Make `slot` hold the first `length` positions of `donor`'s cache."""

    @abstractmethod
    def _cut_cache(self, slot: Slot, length: int) -> bool:
        """Keep the first `length` positions of `slot`'s cache; False where the engine cannot (it then starts over)."""

    def _clear_caches(self) -> None:  # noqa: B027 (engines whose caches need no clearing leave it)
        """Every slot's cache is forgotten (after a failed step)."""

    def _close_engine(self) -> None:  # noqa: B027
        """Free what the engine allocated for the scheduler."""

    # -- what callers use -------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], options: GenerationOptions, emit: Emit,
               cancel: threading.Event | None = None) -> None:
        """Queue a generation; `emit` is called from the scheduler's thread with each chunk."""
        self.runtime.check_prompt_fits(prompt_ids, 1)
        request = Request(list(prompt_ids), options, emit, cancel)
        with self._wake:
            if self._closed:
                raise EdgepackError("the engine is closed")
            self._waiting.append(request)
            self._wake.notify()

    def stream(self, prompt_ids: Sequence[int], options: GenerationOptions,
               cancel: threading.Event | None = None) -> Iterator[GenerationChunk]:
        """The chunks of one generation, for a caller on its own thread. Leaving early cancels it."""
        cancel = cancel or threading.Event()
        chunks: queue.SimpleQueue[GenerationChunk | BaseException] = queue.SimpleQueue()
        self.submit(prompt_ids, options, chunks.put, cancel)
        try:
            while True:
                item = chunks.get()
                if isinstance(item, BaseException):
                    raise item
                if cancel.is_set():  # the scheduler may have made a token more meanwhile: the caller sees none
                    if item.finish_reason is not None:
                        yield GenerationChunk(None, "", finish_reason="cancelled")
                        return
                    continue
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            cancel.set()

    def forget_cache(self) -> None:
        """The engine's memory was used for something else: no slot holds a prefix any more."""
        with self._wake:
            if any(slot.running for slot in self.slots) or self._waiting:
                raise EdgepackError("the engine is generating; it cannot be used for anything else meanwhile")
            for slot in self.slots:
                slot.cached = []

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self._close_engine()

    # -- the scheduler's thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not any(s.running for s in self.slots):
                    self._wake.wait()
                if self._closed:
                    break
                self._admit()
            try:
                for slot in self.slots:
                    if slot.running and slot.request.cancel is not None and slot.request.cancel.is_set():
                        self._finish(slot, slot.stream.cancelled())
                self._step()
            except BaseException as exc:  # the engine is in an unknown state: end every generation with it
                self._fail_all(exc)
        self._fail_all(EdgepackError("the engine was closed"))

    def _admit(self) -> None:
        """Move waiting requests into free slots, first come first served (called holding the lock)."""
        while self._waiting:
            request = self._waiting[0]
            if request.cancel is not None and request.cancel.is_set():
                self._waiting.popleft()
                request.emit(GenerationChunk(None, "", finish_reason="cancelled"))
                continue
            free = [slot for slot in self.slots if not slot.running]
            if not free:
                return
            self._waiting.popleft()
            try:
                self._start(request, free)
            except BaseException as exc:
                request.emit(exc)

    def _before_start(self) -> None:  # noqa: B027
        """Called before a request takes a slot (llama.cpp takes back a context used directly meanwhile)."""

    def _start(self, request: Request, free: list[Slot]) -> None:
        self._before_start()
        prompt = request.prompt_ids
        usable = len(prompt) - 1  # the last prompt token is read again for its logits

        def reusable(slot: Slot) -> int:
            return min(common_prefix(slot.cached, prompt), usable)

        # no prefix anywhere: the least recently used, the lowest sequence first
        slot = max(free, key=lambda s: (reusable(s), -s.last_used, -s.index))
        donor = max(self.slots, key=reusable)
        reused, shared = reusable(slot), reusable(donor)
        if shared > reused and donor is not slot:
            self._copy_cache(donor, slot, shared)
            reused = shared
        elif not self._cut_cache(slot, reused):
            self._cut_cache(slot, 0)
            reused = 0
        slot.cached = prompt[:reused]
        slot.pending = prompt[reused:]
        slot.next_token = None
        slot.sampler = SequenceSampler(self._new_sampler(request))
        runtime = self.runtime
        slot.stream = TokenStream(prompt, request.options, runtime.eos_token_ids, runtime.detokenize,
                                  runtime.context_length)
        slot.request = request
        self._admissions += 1
        slot.admitted = self._admissions
        self.counters.reused_tokens += reused

    def _deliver(self, slot: Slot, token: int, logprob: float | None = None,
                 top_logprobs: tuple[tuple[int, float], ...] = ()) -> None:
        """`token` was picked for `slot`: hand its chunk over, and end the generation when it ends it, or with the
        error its sampler met (`token` then only stands in)."""
        error = slot.sampler.error
        if error is not None:
            request = slot.request
            self._release(slot)
            slot.last_used = time.monotonic()
            request.emit(error)
            return
        chunk = slot.stream.add(token, logprob, top_logprobs)
        if chunk.finish_reason is not None:
            self._finish(slot, chunk)
        else:
            slot.next_token = token
            slot.request.emit(chunk)

    def _finish(self, slot: Slot, chunk: GenerationChunk) -> None:
        request = slot.request
        self._release(slot)
        slot.last_used = time.monotonic()
        request.emit(chunk)

    def _release(self, slot: Slot) -> None:
        slot.request, slot.pending, slot.next_token, slot.stream = None, [], None, None
        if slot.sampler is not None:
            slot.sampler.close()
            slot.sampler = None

    def _fail_all(self, exc: BaseException) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for slot in self.slots:
            if slot.running:
                request = slot.request
                self._release(slot)
                request.emit(exc)
            slot.cached = []
        self._clear_caches()
        for request in waiting:
            request.emit(exc)
