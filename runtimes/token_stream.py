"""A generation's per-token parts, the same for every engine and for each sequence of a batch: the Python sampler
with its grammar (TokenPicker), and what is done with each token picked (TokenStream: the length limit,
end-of-generation tokens, stop strings, UTF-8-safe text pieces)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgepack.core.errors import OutputConstraintError
from runtimes.generation_types import GenerationChunk, GenerationOptions
from runtimes.sampling import Sampler

# why a constrained generation ends early (OutputConstraintError)
NO_TOKEN_ALLOWED = ("the output constraint (response_format or a required tool call) allows no token of this model's "
                    "vocabulary here: it asks for text the model's tokens cannot spell")


class TokenPicker:
    """The Python sampler for engines that hand us logits, with a grammar when output is constrained: the token is
    first picked freely, and only when the grammar refuses it are the logits masked and the pick made again (exactly
    the constrained distribution, as runtimes.llamacpp_sampling.SamplerChain does it, at a fraction of the cost)."""

    def __init__(self, options: GenerationOptions, grammar=None) -> None:
        self.sampler = Sampler(options.temperature, options.top_p, options.top_k, options.seed, options.logit_bias,
                               options.presence_penalty, options.frequency_penalty)
        self.grammar = grammar

    def pick(self, logits: np.ndarray) -> int:
        token = self.sampler.pick(logits)
        if self.grammar is not None:
            if not self.grammar.allows(token, float(logits[token])):
                token = self._pick_allowed(logits)
            self.grammar.accept(token)
        self.sampler.accept(token)
        return token

    def _pick_allowed(self, logits: np.ndarray) -> int:
        """The pick among the tokens the grammar allows; an OutputConstraintError where it allows none (llama.cpp
        aborts the process when a grammar is made to accept a token it refuses)."""
        masked = self.grammar.masked(logits)
        if not (masked > -np.inf).any():
            raise OutputConstraintError(NO_TOKEN_ALLOWED)
        token = self.sampler.pick(masked)
        if masked[token] == -np.inf:
            raise OutputConstraintError(NO_TOKEN_ALLOWED)
        return token

    def close(self) -> None:
        if self.grammar is not None:
            self.grammar.close()
            self.grammar = None


class TokenStream:
    """What a generation does with each token it picked: the length limit, end-of-generation tokens, stop strings
    and UTF-8-safe text pieces, the same for every engine and for each sequence of a batch."""

    def __init__(self, prompt_ids: Sequence[int], options: GenerationOptions, eos_token_ids: frozenset[int],
                 detokenize, context_length: int) -> None:
        self.options = options
        self.eos_token_ids = eos_token_ids
        self.max_tokens = min(options.max_tokens, context_length - len(prompt_ids))
        self.decoder = IncrementalDecoder(detokenize, prompt_ids)
        self.stops = StopMatcher(options.stop)
        self.made = 0

    def add(self, token: int, logprob: float | None = None,
            top_logprobs: tuple[tuple[int, float], ...] = ()) -> GenerationChunk:
        """The chunk for `token`; its finish_reason is set when the generation ends with it."""
        if token in self.eos_token_ids and not self.options.ignore_eos:
            return GenerationChunk(token, self._flush(), logprob, "stop", top_logprobs)
        self.made += 1
        text, stopped = self.stops.feed(self.decoder.add(token))
        if stopped:
            return GenerationChunk(token, text, logprob, "stop", top_logprobs)
        if self.made >= self.max_tokens:
            return GenerationChunk(token, text + self._flush(), logprob, "length", top_logprobs)
        return GenerationChunk(token, text, logprob, None, top_logprobs)

    def cancelled(self) -> GenerationChunk:
        return GenerationChunk(None, self._flush(), finish_reason="cancelled")

    def _flush(self) -> str:
        return self.stops.flush(self.decoder.flush())


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, never emitting half a UTF-8 character.

    It decodes a short window that starts a few tokens back (inside the prompt at first), so a leading space
    that a tokenizer drops at the start of a text is kept, and emits only what the newest token added."""

    def __init__(self, detokenize, prompt_ids: Sequence[int], context_tokens: int = 4) -> None:
        self.detokenize = detokenize
        self.ids = list(prompt_ids[-context_tokens:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix = self.detokenize(self.ids[self.prefix_offset:self.read_offset])
        text = self.detokenize(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""  # an incomplete character: wait for the next token
        new = text[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports when one appears.

    Each stop string is followed with a KMP automaton (how much of it the text ends with), so the work per
    character is constant however long the stop strings are; held back is only what could still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.fallback = [_kmp_failure(stop) for stop in self.stops]
        self.matched = [0] * len(self.stops)  # characters of each stop that the text so far ends with
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hit = False
        for char in text:
            for index, stop in enumerate(self.stops):
                matched = self.matched[index]
                while matched and stop[matched] != char:
                    matched = self.fallback[index][matched - 1]
                if stop[matched] == char:
                    matched += 1
                if matched == len(stop):
                    hit, matched = True, 0
                self.matched[index] = matched
        if hit:  # the earliest start of any stop in what was held back and what came now
            at = min(self.pending.find(stop) for stop in self.stops if stop in self.pending)
            out, self.pending = self.pending[:at], ""
            self.matched = [0] * len(self.stops)
            return out, True
        keep = max(self.matched)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self, text: str = "") -> str:
        out, stopped = self.feed(text)
        if stopped:
            return out
        out, self.pending = out + self.pending, ""
        return out


def _kmp_failure(pattern: str) -> list[int]:
    """failure[i]: the length of the longest proper prefix of pattern[:i + 1] that is also its suffix."""
    failure = [0] * len(pattern)
    length = 0
    for i in range(1, len(pattern)):
        while length and pattern[i] != pattern[length]:
            length = failure[length - 1]
        if pattern[i] == pattern[length]:
            length += 1
        failure[i] = length
    return failure
