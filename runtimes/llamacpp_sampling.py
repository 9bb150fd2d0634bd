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
import sys

import numpy as np

from edgepack.core.errors import EdgepackError, OutputConstraintError
from runtimes.base import GenerationOptions
from runtimes.token_stream import NO_TOKEN_ALLOWED

# llama.cpp's dist sampler takes a 32-bit seed, and 0xFFFFFFFF there means "a random one": seeds are taken modulo
# this so that every seed given reproduces
SEED_RANGE = 2**32 - 1
_PARSE_ERROR = "error parsing grammar: "  # how llama.cpp's parser starts its message, before the whole grammar


class OutputGrammar:
    """A GBNF grammar (rule "root") over a llama.cpp vocabulary, applied to logits we hold as an array: for the engines
    that compute logits themselves (ONNX Runtime) and for SamplerChain. `allows` checks one token, `masked` sets every
    token the grammar refuses to -inf, `accept` moves the grammar past a token."""

    def __init__(self, vocab, grammar: str) -> None:
        import llama_cpp

        self._native = llama_cpp
        self.sampler = compile_grammar(vocab, grammar)

    def allows(self, token: int, logit: float = 0.0) -> bool:
        native = self._native
        one = (native.llama_token_data * 1)(native.llama_token_data(token, logit, 0.0))
        candidate = native.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        native.llama_sampler_apply(self.sampler, ctypes.byref(candidate))
        return one[0].logit != float("-inf")

    def apply(self, candidates) -> None:
        """Mask a llama_token_data_array in place."""
        self._native.llama_sampler_apply(self.sampler, ctypes.byref(candidates))

    def masked(self, logits: np.ndarray) -> np.ndarray:
        data, candidates = token_candidates(self._native, logits)
        self.apply(candidates)
        return data["logit"].copy()

    def accept(self, token: int) -> None:
        self._native.llama_sampler_accept(self.sampler, token)

    def close(self) -> None:
        if self.sampler is not None:
            self._native.llama_sampler_free(self.sampler)
            self.sampler = None


def compile_grammar(vocab, grammar: str):
    """llama.cpp's grammar sampler for `grammar` (GBNF, rule "root") over `vocab`; an EdgepackError with llama.cpp's
    reason when it refuses it. Its parser prints the whole grammar after an error, with a raw fprintf no log callback
    sees: what it writes meanwhile is passed on to stderr without the grammar."""
    import llama_cpp

    from runtimes.native_stderr import captured_native_stderr

    with captured_native_stderr() as captured:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    shown, reason = _without_grammar(captured[0], grammar)
    if shown:
        sys.stderr.write(shown)
    if not sampler:
        raise EdgepackError(f"llama.cpp refused the output grammar: {reason}")
    return sampler


def _without_grammar(text: str, grammar: str) -> tuple[str, str]:
    """llama.cpp's stderr output with the grammar it printed left out, and its reason for refusing the grammar."""
    at = text.find(_PARSE_ERROR)
    if at < 0:
        lines = [line.strip() for line in text.splitlines() if "grammar" in line]
        return text, lines[-1][:160] if lines else "a rule can start with itself (left recursion)"
    dump = text.find(grammar, at)  # printed after the reason, which may quote the rest of the grammar itself
    end = dump + len(grammar) if dump >= 0 else len(text)
    reason = text[at + len(_PARSE_ERROR):end].split("\n", 1)[0][:160]
    shown = f"{text[:at]}{_PARSE_ERROR}{reason} [the grammar, {len(grammar)} characters, is not shown]\n"
    return shown + text[end:].lstrip("\n"), reason


def token_candidates(native, logits: np.ndarray):
    """Every token with its logit, as llama.cpp's samplers take them (the array must outlive their use)."""
    data = np.empty(len(logits), dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
    data["id"] = np.arange(len(logits), dtype=np.int32)
    data["logit"] = logits
    data["p"] = 0.0
    pointer = data.ctypes.data_as(ctypes.POINTER(native.llama_token_data))
    return data, native.llama_token_data_array(data=pointer, size=len(logits), selected=-1, sorted=False)


class SamplerChain:
    """One generation's sampler chain; `sample(ctx, batch_index)` picks from the logits of that batch row and tells
    the samplers that keep state (penalties, grammar, the random draw) about the token.

    A grammar is checked the way llama.cpp's own tools do it: the token is first picked without it, and only when the
    grammar refuses that token is the whole vocabulary masked by the grammar and the pick made again. The result has
    the constrained distribution exactly (a valid token is kept with its unconstrained probability, and the rest of
    the time drawn from the constrained one, which adds up to it), at a fraction of the cost of masking every step
    (measured on the demo student: ~10 ms a token to mask 49,152 entries)."""

    def __init__(self, vocab, n_vocab: int, options: GenerationOptions, penalty_window: int) -> None:
        import llama_cpp

        self._native = llama_cpp
        self.n_vocab = n_vocab
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self.chain = llama_cpp.llama_sampler_chain_init(params)
        self.grammar = None
        try:
            self._build(n_vocab, options, penalty_window)
            if options.grammar is not None:
                self.grammar = OutputGrammar(vocab, options.grammar)
        except BaseException:
            self.close()
            raise

    def _add(self, sampler) -> None:
        if not sampler:
            raise EdgepackError("llama.cpp could not set up a sampler")
        self._native.llama_sampler_chain_add(self.chain, sampler)  # the chain owns it from now on

    def _build(self, n_vocab: int, options: GenerationOptions, penalty_window: int) -> None:
        native = self._native
        if options.logit_bias:
            biases = (native.llama_logit_bias * len(options.logit_bias))(
                *(native.llama_logit_bias(token, bias) for token, bias in options.logit_bias))
            self._add(native.llama_sampler_init_logit_bias(n_vocab, len(options.logit_bias), biases))
        if options.presence_penalty or options.frequency_penalty:
            self._add(native.llama_sampler_init_penalties(n_vocab, max(penalty_window, 1), 1.0,
                                                          options.frequency_penalty, options.presence_penalty))
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
        """Sample from the logits of `batch_index` in the last decode, and accept the token."""
        native = self._native
        if self.grammar is None:
            return int(native.llama_sampler_sample(self.chain, ctx, batch_index))  # picks and accepts
        logits = np.ctypeslib.as_array(native.llama_get_logits_ith(ctx, batch_index), shape=(self.n_vocab,))
        token = self._pick(logits, with_grammar=False)
        if not self.grammar.allows(token, float(logits[token])):
            token = self._pick(logits, with_grammar=True)
        self.grammar.accept(token)
        native.llama_sampler_accept(self.chain, token)
        return token

    def _pick(self, logits: np.ndarray, with_grammar: bool) -> int:
        """With the grammar: an OutputConstraintError where it allows no token (llama.cpp aborts the process when a
        grammar is made to accept a token it refuses, or an end of generation before it is complete)."""
        data, candidates = token_candidates(self._native, logits)
        allowed = None
        if with_grammar:
            self.grammar.apply(candidates)
            allowed = data["logit"] > -np.inf  # by token id: the chain below may reorder the candidates
            if not allowed.any():
                raise OutputConstraintError(NO_TOKEN_ALLOWED)
        self._native.llama_sampler_apply(self.chain, ctypes.byref(candidates))
        token = int(candidates.data[candidates.selected].id)
        if allowed is not None and not allowed[token]:
            raise OutputConstraintError(NO_TOKEN_ALLOWED)
        return token

    def close(self) -> None:
        if self.chain is not None:
            self._native.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar is not None:
            self.grammar.close()
            self.grammar = None
