"""Ollama's request bodies, as its server reads them: fields it does not use are ignored, not refused."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgepack.core.errors import ApiError
from edgepack.serve.json_bounds import check_json_size
from edgepack.serve.protocol import INLINE_PARSE_BYTES


class Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # Ollama ignores what it does not use; so do we


class OllamaOptions(Lenient):
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    num_predict: int | None = None  # -1: no limit, -2: until the context is full
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class OllamaMessage(Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[Any] | None = None


class OllamaRequest(Lenient):
    model: str = Field(min_length=1)
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    images: list[Any] | None = None


class OllamaChat(OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)


class OllamaGenerate(OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False


class OllamaShow(Lenient):
    model: str | None = None
    name: str | None = None  # older clients send the name here


async def parse_ollama(request: Request, kind: type[BaseModel]) -> Any:
    """The body as `kind` (an empty one as `{}`, as Ollama takes it; a large one parsed on a worker thread); a mistake
    is a 400 in Ollama's shape."""
    raw = await request.body()

    def parse() -> Any:
        check_json_size(raw)
        return kind.model_validate_json(raw or b"{}")

    try:
        return await asyncio.to_thread(parse) if len(raw) > INLINE_PARSE_BYTES else parse()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise ApiError(400, f"{where or 'body'}: {first.get('msg')}" if first.get("type") != "json_invalid"
                       else f"the request body is not valid JSON: {first.get('msg')}") from None
