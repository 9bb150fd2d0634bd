"""What passes between a caller and an engine: how to load a variant, how to generate, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Device = Literal["cpu", "cuda", "metal"]
DEVICES: tuple[str, ...] = get_args(Device)


@dataclass(frozen=True)
class LoadOptions:
    threads: int | None = None  # None: one per physical core
    context_length: int | None = None  # None: the model's own, capped at DEFAULT_CONTEXT_CAP
    device: Device = "cpu"  # where the engine supports it
    parallel: int = 1  # sequences generated at once, each with context_length tokens (llama.cpp batches them)


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: this many most likely tokens at each step, with theirs
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence
    grammar: str | None = None  # GBNF (rule "root"): output constrained to it; engines without grammars refuse
    ignore_eos: bool = False  # benchmarks generate a fixed number of tokens


@dataclass(frozen=True)
class GenerationChunk:
    """One step of a stream: the token made, the text it completes (may be "" while a multi-byte character or a
    possible stop string is held back) and, on the last chunk, why generation ended."""

    token_id: int | None
    text: str
    logprob: float | None = None
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "cancelled"
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first, when asked for


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int = field(default=0)
