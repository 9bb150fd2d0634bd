"""Continuous batching on one llama.cpp context (the shared scheduler is runtimes.batching): each step is one
`llama_decode` of one decode token for every running sequence plus prompt tokens of newly admitted ones (first
come, first served; while others decode, at most `prefill_chunk` prompt tokens a step, so a long prompt cannot
stall running streams), then each sequence's next token is sampled with its own sampler chain
(runtimes.llamacpp_sampling). Slots are llama.cpp sequences; a prefix is copied between them with
llama_memory_seq_cp.
"""

from __future__ import annotations

import numpy as np

from edgepack.core.errors import EdgepackError
from runtimes.batching import DEFAULT_PREFILL_CHUNK, Request, SequenceScheduler, Slot
from runtimes.llamacpp_sampling import SamplerChain
from runtimes.sampling import token_logprobs


class BatchScheduler(SequenceScheduler):
    """Generations from many threads on one LlamaCppRuntime context with `slots` sequences."""

    def __init__(self, runtime, slots: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        import llama_cpp

        self._native = llama_cpp
        self._ctx = runtime._ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_batch = runtime._n_batch
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self.prefill_chunk = max(1, min(prefill_chunk, self._n_batch))
        super().__init__(runtime, slots)

    def _before_start(self) -> None:
        if self.runtime._claim_memory("batch"):
            for slot in self.slots:
                slot.cached = []

    def _copy_cache(self, donor: Slot, slot: Slot, length: int) -> None:
        self._native.llama_memory_seq_cp(self._memory, donor.index, slot.index, -1, -1)
        self._native.llama_memory_seq_rm(self._memory, slot.index, length, -1)

    def _cut_cache(self, slot: Slot, length: int) -> bool:
        return bool(self._native.llama_memory_seq_rm(self._memory, slot.index, length, -1))

    def _new_sampler(self, request: Request) -> SamplerChain:
        options = request.options
        return SamplerChain(self.runtime._vocab, self.runtime._n_vocab, options, penalty_window=options.max_tokens)

    def _clear_caches(self) -> None:
        self._native.llama_memory_clear(self._memory, True)

    def _close_engine(self) -> None:
        if self._batch is not None:
            self._native.llama_batch_free(self._batch)
            self._batch = None

    def _step(self) -> None:
        batch, rows = self._batch, []
        n = 0

        def add(slot: Slot, token: int, wants_logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = len(slot.cached)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.index
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

    def _sample(self, slot: Slot, row: int) -> None:
        options = slot.request.options
        token = slot.sampler.sample(self._ctx, row)
        logprob, top = None, ()
        if options.logprobs:
            pointer = self._native.llama_get_logits_ith(self._ctx, row)
            logits = np.ctypeslib.as_array(pointer, shape=(self.runtime._n_vocab,))
            logprob, top = token_logprobs(logits, token, options.top_logprobs)
        self._deliver(slot, token, logprob, top)
