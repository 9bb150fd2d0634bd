"""The OpenAI request bodies the server accepts, and its error shape.

Fields the OpenAI API defines but this server cannot honour are refused with a 400 naming them, as are fields
the API does not define (OpenAI answers "Unrecognized request argument"), so a client never silently gets
something other than what it asked for.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


MAX_SEED = 2**63 - 1  # what the engines' random generators take
MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256  # stop matching holds back at most this much text


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def unsupported(self) -> str | None:
        """A field set to something this server does not do, with what it accepts."""
        if self.n != 1:
            return "n: only 1 choice per request is supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty/frequency_penalty: only 0 is supported"
        if self.stop is not None and len(self.stops()) > MAX_STOPS:
            return f"stop: at most {MAX_STOPS} sequences"
        if any(len(stop) > MAX_STOP_CHARS or not stop for stop in self.stops()):
            return f"stop: each sequence must have 1 to {MAX_STOP_CHARS} characters"
        return None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> str | None:
        if self.top_logprobs:
            return "top_logprobs: only 0 is supported (logprobs of the chosen tokens are)"
        return super().unsupported()


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # the completions API's own default
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    def limit(self) -> int | None:
        return self.max_tokens

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def unsupported(self) -> str | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt: one prompt per request (a string or a list of one)"
        if self.logprobs:
            return "logprobs: only 0 is supported (the chosen tokens' logprobs come with logprobs=0)"
        if self.echo:
            return "echo: not supported"
        return super().unsupported()
