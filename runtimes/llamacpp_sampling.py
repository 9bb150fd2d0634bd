"""llama.cpp's own sampler chain, set up from GenerationOptions: sampling runs in C over the whole vocabulary
(in Python it cost ~7 ms a token on a 49k vocabulary).

The chain's order matches runtimes.sampling.Sampler: logit bias, presence/frequency penalties over the generated
tokens, the grammar (when output is constrained), then temperature, top-k and top-p on the tempered distribution,
and a seeded draw (or the argmax at temperature 0). A seed reproduces an answer on this engine; the Python
sampler's random stream is another, so the same seed picks differently on ONNX Runtime.
"""

from __future__ import annotations

import ctypes
import secrets

from edgepack.core.errors import EdgepackError
from runtimes.base import GenerationOptions

# llama.cpp's dist sampler takes a 32-bit seed, and 0xFFFFFFFF there means "a random one": seeds are taken modulo
# this so that every seed given reproduces
SEED_RANGE = 2**32 - 1


class SamplerChain:
    """One generation's sampler chain; `sample(ctx, batch_index)` picks from the logits of that batch row and tells
    the chain (penalties, grammar) about the token."""

    def __init__(self, vocab, n_vocab: int, options: GenerationOptions, penalty_window: int) -> None:
        import llama_cpp

        self._native = llama_cpp
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self.chain = llama_cpp.llama_sampler_chain_init(params)
        try:
            self._build(vocab, n_vocab, options, penalty_window)
        except BaseException:
            self.close()
            raise

    def _add(self, sampler) -> None:
        if not sampler:
            raise EdgepackError("llama.cpp could not set up a sampler")
        self._native.llama_sampler_chain_add(self.chain, sampler)  # the chain owns it from now on

    def _build(self, vocab, n_vocab: int, options: GenerationOptions, penalty_window: int) -> None:
        native = self._native
        if options.logit_bias:
            biases = (native.llama_logit_bias * len(options.logit_bias))(
                *(native.llama_logit_bias(token, bias) for token, bias in options.logit_bias))
            self._add(native.llama_sampler_init_logit_bias(n_vocab, len(options.logit_bias), biases))
        if options.presence_penalty or options.frequency_penalty:
            self._add(native.llama_sampler_init_penalties(n_vocab, max(penalty_window, 1), 1.0,
                                                          options.frequency_penalty, options.presence_penalty))
        if options.grammar is not None:
            grammar = native.llama_sampler_init_grammar(vocab, options.grammar.encode("utf-8"), b"root")
            if not grammar:
                raise EdgepackError("llama.cpp could not parse the output grammar (GBNF with a 'root' rule)")
            self._add(grammar)
        if options.temperature == 0:
            self._add(native.llama_sampler_init_greedy())
            return
        self._add(native.llama_sampler_init_temp(options.temperature))
        if options.top_k > 0:
            self._add(native.llama_sampler_init_top_k(options.top_k))
        if options.top_p < 1.0:
            self._add(native.llama_sampler_init_top_p(options.top_p, 1))
        seed = options.seed % SEED_RANGE if options.seed is not None else secrets.randbelow(SEED_RANGE)
        self._add(native.llama_sampler_init_dist(ctypes.c_uint32(seed).value))

    def sample(self, ctx, batch_index: int) -> int:
        """Sample from the logits of `batch_index` in the last decode, and accept the token (llama.cpp does both)."""
        return int(self._native.llama_sampler_sample(self.chain, ctx, batch_index))

    def close(self) -> None:
        if self.chain is not None:
            self._native.llama_sampler_free(self.chain)
            self.chain = None
