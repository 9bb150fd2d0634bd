"""Token sampling from next-token logits in Python, for the engines that hand us logits (ONNX Runtime, torch).
llama.cpp samples with its own sampler chain instead (runtimes.llamacpp_sampling), set up from the same options.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - float(np.max(logits))
    return shifted - np.log(np.sum(np.exp(shifted)))


def token_logprobs(logits: np.ndarray, token: int, top_n: int = 0) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The log-probability of `token` under the model's own distribution (before temperature and penalties), and
    the `top_n` most likely tokens with theirs, most likely first."""
    values = log_softmax(logits)
    if top_n <= 0:
        return float(values[token]), ()
    top = np.argpartition(-values, min(top_n, len(values) - 1))[:top_n]
    top = top[np.argsort(-values[top], kind="stable")]
    return float(values[token]), tuple((int(t), float(values[t])) for t in top)


class Sampler:
    """Temperature, top-k and top-p (on the tempered distribution, in that order), with OpenAI's logit bias and
    presence/frequency penalties over the tokens generated so far (`accept` tells it each one)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 logit_bias: Sequence[tuple[int, float]] = (), presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0):
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.rng = np.random.default_rng(seed)
        self.logit_bias = tuple(logit_bias)
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.generated: Counter[int] = Counter()

    def accept(self, token: int) -> None:
        self.generated[token] += 1

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The logits after logit bias and penalties (a copy when anything applies)."""
        if not self.logit_bias and not (self.generated and (self.presence_penalty or self.frequency_penalty)):
            return logits
        logits = logits.astype(np.float64)
        for token, bias in self.logit_bias:
            logits[token] += bias
        for token, count in self.generated.items():
            logits[token] -= count * self.frequency_penalty + self.presence_penalty
        return logits

    def pick(self, logits: np.ndarray) -> int:
        logits = self.adjusted(logits)
        if self.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        order = np.argsort(-scaled, kind="stable")
        if self.top_k > 0:
            order = order[: self.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
