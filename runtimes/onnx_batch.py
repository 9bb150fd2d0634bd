"""Continuous batching on our ONNX decoder graph (the shared scheduler is runtimes.batching).

Each slot is a row of KV buffers sized for the whole context, bound as both past and present, so
GroupQueryAttention writes each new position in place. A step is one forward pass of one token for every decoding
row (rows 0..B-1 as one batch: each row's attention mask says how many positions it holds, so rows at different
lengths decode together), then one chunk of an admitted prompt, read on that prompt's row alone. A row in the batch
that is not decoding gets a dummy token written just past its cached positions, where nothing reads it.
"""

from __future__ import annotations

import numpy as np

from runtimes.batching import DEFAULT_PREFILL_CHUNK, Request, SequenceScheduler, Slot
from runtimes.sampling import token_logprobs
from runtimes.token_stream import TokenPicker


class OnnxBatchScheduler(SequenceScheduler):
    """Generations from many threads on one OnnxRuntime whose graph shares past and present KV buffers."""

    def __init__(self, runtime, slots: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.prefill_chunk = prefill_chunk
        shape = (slots, runtime._kv_heads, runtime.context_length, runtime._head_dim)
        # zeros from calloc: pages become resident only as positions are written
        self._kv = [np.zeros(shape, runtime._kv_dtype) for _ in runtime._past_names]
        self._positions = np.arange(runtime.context_length, dtype=np.int64)
        self._ids = np.zeros((slots, 1), dtype=np.int64)
        self._logits = np.zeros((slots, 1, runtime._vocab), dtype=np.float32)
        self._row_bindings: dict[int, object] = {}  # row -> binding of that row's buffers (prompt chunks)
        self._batch_bindings: dict[int, object] = {}  # B -> binding of rows 0..B-1 (decode steps)
        super().__init__(runtime, slots)

    def _binding(self, rows: slice):
        runtime = self.runtime
        binding = runtime.session.io_binding()
        binding.bind_output("logits", "cpu")  # first, so it stays output 0 when rebound
        for past, present, buffer in zip(runtime._past_names, runtime._present_names, self._kv, strict=True):
            value = runtime._ortvalue(buffer[rows])
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding

    def _copy_cache(self, donor: Slot, slot: Slot, length: int) -> None:
        for buffer in self._kv:
            buffer[slot.index, :, :length] = buffer[donor.index, :, :length]

    def _cut_cache(self, slot: Slot, length: int) -> bool:
        return True  # positions past `length` are overwritten as they are read again, and masked until then

    def _new_sampler(self, request: Request) -> TokenPicker:
        return TokenPicker(request.options, self.runtime.output_grammar(request.options.grammar))

    def _close_engine(self) -> None:
        self._row_bindings, self._batch_bindings, self._kv = {}, {}, []

    def _step(self) -> None:
        decoding = [s for s in self.slots if s.running and s.next_token is not None]
        if decoding:
            self._decode(decoding)
        prompts = sorted((s for s in self.slots if s.running and s.pending), key=lambda s: s.admitted)
        if prompts:
            self._read_prompt(prompts[0], self.prefill_chunk if decoding else self.runtime.prefill_chunk)

    def _decode(self, decoding: list[Slot]) -> None:
        rows = max(slot.index for slot in decoding) + 1
        decoding_rows = {slot.index for slot in decoding}
        lengths = np.empty(rows, dtype=np.int64)
        for slot in self.slots[:rows]:
            if slot.index in decoding_rows:
                self._ids[slot.index, 0] = slot.next_token
                slot.cached.append(slot.next_token)
                slot.next_token = None
                lengths[slot.index] = len(slot.cached)
            else:  # a dummy token, written just past what this row holds
                self._ids[slot.index, 0] = 0
                del slot.cached[self.runtime.context_length - 1:]
                lengths[slot.index] = len(slot.cached) + 1
        mask = (self._positions[:int(lengths.max())][None, :] < lengths[:, None]).astype(np.int64)
        binding = self._batch_bindings.get(rows)
        if binding is None:
            binding = self._batch_bindings[rows] = self._binding(slice(0, rows))
        logits = self._logits[:rows]
        binding.bind_cpu_input("input_ids", self._ids[:rows])
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits", "cpu", element_type=np.float32, shape=logits.shape,
                            buffer_ptr=logits.ctypes.data)
        self.runtime.session.run_with_iobinding(binding)
        self.counters.steps += 1
        for slot in decoding:
            self._pick(slot, logits[slot.index, 0])

    def _read_prompt(self, slot: Slot, budget: int) -> None:
        chunk, slot.pending = slot.pending[:budget], slot.pending[budget:]
        slot.cached.extend(chunk)
        binding = self._row_bindings.get(slot.index)
        if binding is None:
            binding = self._row_bindings[slot.index] = self._binding(slice(slot.index, slot.index + 1))
        binding.bind_cpu_input("input_ids", np.asarray([chunk], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, len(slot.cached)), dtype=np.int64))
        binding.bind_output("logits", "cpu")
        self.runtime.session.run_with_iobinding(binding)
        self.counters.steps += 1
        if not slot.pending:
            self._pick(slot, binding.get_outputs()[0].numpy()[0, -1])

    def _pick(self, slot: Slot, logits: np.ndarray) -> None:
        options = slot.request.options
        token = slot.sampler.pick(logits)
        logprob, top = token_logprobs(logits, token, options.top_logprobs) if options.logprobs else (None, ())
        self._deliver(slot, token, logprob, top)
