"""Continuous batching on one llama.cpp context: several generations share each `llama_decode`.

On a CPU, decoding one token is bound by reading the weights; a batch of four sequences reads them once for four
tokens. The scheduler owns the context's N sequences (slots, each with a KV cache of its own) and runs on a thread
of its own.
Each step it builds one batch of one decode token for every running sequence plus prompt tokens of newly
admitted ones (first come, first served; while others decode, at most `prefill_chunk` prompt tokens a step, so a
long prompt cannot stall running streams), decodes it, and samples each sequence's next token with that
sequence's own sampler chain (runtimes.llamacpp_sampling).

Prefix cache: a finished sequence keeps its KV. A new request takes the idle slot whose cached tokens share the
longest prefix with its prompt and reads only the rest; when a running or other idle sequence shares a longer
prefix, its cache is copied into the new slot and cut after the shared part (llama.cpp copies whole caches between
sequences: a memory copy, far cheaper than reading the prefix again). The last prompt token is always read again,
for its logits.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgepack.core.errors import EdgepackError
from runtimes.base import GenerationChunk, GenerationOptions, TokenStream
from runtimes.llamacpp_sampling import SamplerChain
from runtimes.sampling import token_logprobs

Emit = Callable[[GenerationChunk | BaseException], None]
# While other sequences decode, a prompt is read at most this many tokens a step: on a 2-core CPU a step of 128
# prompt tokens takes ~0.4 s, the longest pause a running stream then sees (256 would double it; smaller chunks
# make a long prompt's first token later)
DEFAULT_PREFILL_CHUNK = 128


@dataclass
class _Request:
    prompt_ids: list[int]
    options: GenerationOptions
    emit: Emit  # gets each chunk (the last has a finish_reason) or the exception that ended the generation
    cancel: threading.Event | None


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # the tokens whose KV this sequence holds, from position 0
    request: _Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to read
    next_token: int | None = None  # sampled, to be read next step
    chain: SamplerChain | None = None
    stream: TokenStream | None = None
    last_used: float = 0.0
    admitted: int = 0  # admission order: prompts are read first come, first served

    @property
    def running(self) -> bool:
        return self.request is not None


@dataclass
class BatchCounters:
    reused_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed
    steps: int = 0  # llama_decode calls


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class BatchScheduler:
    """Generations from many threads on one LlamaCppRuntime context with `slots` sequences."""

    def __init__(self, runtime, slots: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        import llama_cpp

        self._native = llama_cpp
        self.runtime = runtime
        self._ctx = runtime._ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_batch = runtime._n_batch
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self.prefill_chunk = max(1, min(prefill_chunk, self._n_batch))
        self.slots = [_Slot(seq_id) for seq_id in range(slots)]
        self.counters = BatchCounters()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._admissions = 0
        self._thread = threading.Thread(target=self._run, name="edgepack-batch", daemon=True)
        self._thread.start()

    # -- what callers use -------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], options: GenerationOptions, emit: Emit,
               cancel: threading.Event | None = None) -> None:
        """Queue a generation; `emit` is called from the scheduler's thread with each chunk."""
        self.runtime.check_prompt_fits(prompt_ids, 1)
        request = _Request(list(prompt_ids), options, emit, cancel)
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
        """The context's memory was used for something else: no slot holds a prefix any more."""
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
        if self._batch is not None:
            self._native.llama_batch_free(self._batch)
            self._batch = None

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
                self._step()
            except BaseException as exc:  # the context is in an unknown state: end every generation with it
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

    def _start(self, request: _Request, free: list[_Slot]) -> None:
        if self.runtime._claim_memory("batch"):
            for slot in self.slots:
                slot.cached = []
        prompt = request.prompt_ids
        usable = len(prompt) - 1  # the last prompt token is read again for its logits

        def reusable(slot: _Slot) -> int:
            return min(common_prefix(slot.cached, prompt), usable)

        slot = max(free, key=lambda s: (reusable(s), -s.last_used))  # no prefix anywhere: the least recently used
        donor = max(self.slots, key=reusable)
        reused, shared = reusable(slot), reusable(donor)
        native, memory = self._native, self._memory
        if shared > reused and donor is not slot:
            native.llama_memory_seq_cp(memory, donor.seq_id, slot.seq_id, -1, -1)
            native.llama_memory_seq_rm(memory, slot.seq_id, shared, -1)
            reused = shared
        elif not native.llama_memory_seq_rm(memory, slot.seq_id, reused, -1):
            native.llama_memory_seq_rm(memory, slot.seq_id, 0, -1)
            reused = 0
        slot.cached = prompt[:reused]
        slot.pending = prompt[reused:]
        slot.next_token = None
        runtime = self.runtime
        slot.chain = SamplerChain(runtime._vocab, runtime._n_vocab, request.options,
                                  penalty_window=request.options.max_tokens)
        slot.stream = TokenStream(prompt, request.options, runtime.eos_token_ids, runtime.detokenize,
                                  runtime.context_length)
        slot.request = request
        self._admissions += 1
        slot.admitted = self._admissions
        self.counters.reused_tokens += reused

    def _step(self) -> None:
        for slot in self.slots:
            if slot.running and slot.request.cancel is not None and slot.request.cancel.is_set():
                self._finish(slot, slot.stream.cancelled())
        batch, rows = self._batch, []
        n = 0

        def add(slot: _Slot, token: int, wants_logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = len(slot.cached)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = wants_logits
            if wants_logits:
                rows.append((slot, n))
            slot.cached.append(token)
            n += 1

        decoding = [s for s in self.slots if s.running and s.next_token is not None]
        for slot in decoding:
            add(slot, slot.next_token, True)
            slot.next_token = None
        budget = self._n_batch - n
        if decoding:
            budget = min(budget, self.prefill_chunk)
        for slot in sorted((s for s in self.slots if s.running and s.pending), key=lambda s: s.admitted):
            if budget <= 0:
                break
            take, slot.pending = slot.pending[:budget], slot.pending[budget:]
            for i, token in enumerate(take):
                add(slot, token, not slot.pending and i == len(take) - 1)
            budget -= len(take)
        if n == 0:
            return
        batch.n_tokens = n
        if self._native.llama_decode(self._ctx, batch) != 0:
            raise EdgepackError(f"llama.cpp failed to decode a batch of {n} tokens")
        self.counters.steps += 1
        for slot, row in rows:
            self._sample(slot, row)

    def _sample(self, slot: _Slot, row: int) -> None:
        options = slot.request.options
        token = slot.chain.sample(self._ctx, row)
        logprob, top = None, ()
        if options.logprobs:
            pointer = self._native.llama_get_logits_ith(self._ctx, row)
            logits = np.ctypeslib.as_array(pointer, shape=(self.runtime._n_vocab,))
            logprob, top = token_logprobs(logits, token, options.top_logprobs)
        chunk = slot.stream.add(token, logprob, top)
        if chunk.finish_reason is not None:
            self._finish(slot, chunk)
        else:
            slot.next_token = token
            slot.request.emit(chunk)

    def _finish(self, slot: _Slot, chunk: GenerationChunk) -> None:
        request = slot.request
        slot.request, slot.pending, slot.next_token, slot.stream = None, [], None, None
        slot.chain.close()
        slot.chain = None
        slot.last_used = time.monotonic()
        request.emit(chunk)

    def _fail_all(self, exc: BaseException) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for slot in self.slots:
            if slot.running:
                request = slot.request
                slot.request, slot.pending, slot.next_token, slot.stream = None, [], None, None
                if slot.chain is not None:
                    slot.chain.close()
                    slot.chain = None
                request.emit(exc)
            slot.cached = []
        self._native.llama_memory_clear(self._memory, True)
        for request in waiting:
            request.emit(exc)
