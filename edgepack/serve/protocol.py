"""The OpenAI request bodies the server accepts, and its error shape.

Fields the OpenAI API defines but this server cannot honour are refused with a 400 naming them, as are fields
the API does not define (OpenAI answers "Unrecognized request argument"), so a client never silently gets
something other than what it asked for.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgepack.serve.json_bounds import check_json_size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for a function's name
MAX_ID_CHARS = 128


class FunctionCall(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str  # a JSON object, as text


class ToolCallMessagePart(_Strict):
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only on an assistant message that made tool calls
    name: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    tool_calls: list[ToolCallMessagePart] | None = None  # what an assistant called
    tool_call_id: str | None = Field(default=None, max_length=MAX_ID_CHARS)  # on a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (HF's convention: a call's arguments as an object)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": _arguments_object(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            message["name"] = self.name
        return message


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # as given: the template writes it as text


class FunctionSpec(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


MAX_SEED = 2**63 - 1  # what the engines' random generators take
MAX_STOPS = 4  # as OpenAI's API
MAX_CHOICES = 8  # n: choices generated side by side, each a sequence of the engine
MAX_STOP_CHARS = 256  # stop matching holds back at most this much text


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    """`text`, `json_object` (any JSON object) or `json_schema` (an object that validates against the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Strict):
    model: str | None = None  # None or any name but the upstream model's: the local model
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # not OpenAI's, but llama-server's, vLLM's and Ollama's: 0 is no cut
    seed: int | None = Field(default=None, ge=-1, le=MAX_SEED)  # -1: a random one, as llama.cpp's servers take it
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> -100..100 added to its logit
    response_format: ResponseFormat | None = None

    def seed_value(self) -> int | None:
        return None if self.seed == -1 else self.seed

    def logit_biases(self) -> tuple[tuple[int, float], ...]:
        """The logit bias as (token id, bias); ValueError naming a key that is not a token id or a bias out of range."""
        biases = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias: {key!r} is not a token id (keys are token ids, as strings)")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: the bias for {key} is {bias}; accepted: -100 to 100")
            biases.append((int(key), float(bias)))
        return tuple(biases)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def unsupported(self) -> str | None:
        """A field set to something this server does not do, with what it accepts."""
        if self.response_format is not None and self.response_format.type == "json_schema" and (
                self.response_format.json_schema is None or self.response_format.json_schema.schema_ is None):
            return "response_format: type json_schema needs json_schema.schema (a JSON Schema object)"
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
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def tools_offered(self) -> list[dict[str, Any]] | None:
        """The tools the model is told about (none with tool_choice "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def top_logprob_count(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0

    def unsupported(self) -> str | None:
        if self.tool_choice is not None and not self.tools:
            return "tool_choice: given without tools (as OpenAI's API, tool_choice needs tools)"
        return super().unsupported()


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # the completions API's own default
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    def limit(self) -> int | None:
        return self.max_tokens

    def top_logprob_count(self) -> int:
        return self.logprobs or 0

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def unsupported(self) -> str | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt: one prompt per request (a string or a list of one)"
        if self.echo:
            return "echo: not supported"
        return super().unsupported()


INLINE_PARSE_BYTES = 64 * 1024  # larger bodies are parsed on a worker thread, so /health stays quick
Body = TypeVar("Body", bound=BaseModel)


async def parse_body(request: Request, kind: type[Body]) -> Body:
    """The body as `kind`; a large one is parsed on a worker thread. Mistakes become 400s (RequestValidationError)."""
    raw = await request.body()

    def parse() -> Body:
        check_json_size(raw)
        try:
            return kind.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None

    return await asyncio.to_thread(parse) if len(raw) > INLINE_PARSE_BYTES else parse()
