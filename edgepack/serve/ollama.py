"""Ollama's API on the same server, for the desktop apps and tools that speak it: `POST /api/chat`,
`POST /api/generate`, `GET /api/tags`, `POST /api/show`, `GET /api/ps`, `GET /api/version`.

Requests (edgepack.serve.ollama_protocol) are translated into the server's own OpenAI request models and answered
through edgepack.serve.planning's `local_generation` (the same engine, queue bound, limits, cancellation and
grammars as /v1). Streams are newline-delimited JSON, Ollama's
default; the last object has `done: true`, `done_reason` and the counts and durations (nanoseconds) Ollama reports.
Errors are `{"error": "..."}` (edgepack.serve.http_errors answers every error under /api/ in that shape). Like
Ollama, any model name is answered, by the one model served, and echoed back.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from edgepack.core.errors import ApiError
from edgepack.serve.engine_stream import SlotStreamingResponse, stream_failure, until_disconnect
from edgepack.serve.http_errors import request_id
from edgepack.serve.ollama_protocol import (
    OllamaChat,
    OllamaGenerate,
    OllamaOptions,
    OllamaRequest,
    OllamaShow,
    parse_ollama,
)
from edgepack.serve.planning import local_generation
from edgepack.serve.protocol import ChatRequest, CompletionRequest
from edgepack.serve.responses import GenerationPlan, visible
from edgepack.serve.state import ServerState
from runtimes.base import GenerationChunk

# The Ollama server version these answers follow (what /api/version reports; clients check it), not edgepack's
OLLAMA_API_VERSION = "0.12.0"
OLLAMA_DEFAULT_TEMPERATURE = 0.8  # Ollama's defaults where a request names none
OLLAMA_DEFAULT_TOP_P = 0.9
OLLAMA_DEFAULT_TOP_K = 40
NDJSON = "application/x-ndjson"


def add_ollama_routes(app: FastAPI, state: ServerState) -> None:
    """Register Ollama's routes on the server's app."""

    @app.post("/api/chat")
    async def chat(request: Request):
        body = await parse_ollama(request, OllamaChat)
        if any(message.images for message in body.messages):
            raise ApiError(400, "this model takes text only: images are not accepted")
        _loaded_model(state)
        if not body.messages:  # Ollama's way to load a model (`ollama run` sends this first): done at once
            return JSONResponse({"model": body.model, "created_at": _now(),
                                 "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        openai_body = _openai_request(ChatRequest, body, messages=messages)
        return await _answer(state, request, body, openai_body, "chat")

    @app.post("/api/generate")
    async def generate(request: Request):
        body = await parse_ollama(request, OllamaGenerate)
        if body.images:
            raise ApiError(400, "this model takes text only: images are not accepted")
        model = _loaded_model(state)
        if not body.prompt:  # Ollama answers an empty prompt by loading the model: done at once
            return JSONResponse({"model": body.model, "created_at": _now(), "response": "", "done": True,
                                 "done_reason": "load"})
        if body.raw or not model.has_chat_template():
            prompt = body.prompt if body.raw or not body.system else f"{body.system}\n\n{body.prompt}"
            openai_body = _openai_request(CompletionRequest, body, prompt=prompt)
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
                {"role": "user", "content": body.prompt}]
            openai_body = _openai_request(ChatRequest, body, messages=messages)
        return await _answer(state, request, body, openai_body, "generate")

    @app.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [await _model_entry(state)]}

    @app.get("/api/ps")
    async def running() -> dict[str, Any]:
        entry = await _model_entry(state)
        return {"models": [{**entry, "expires_at": "2099-01-01T00:00:00Z", "size_vram": 0}]}

    @app.post("/api/show")
    async def show(request: Request) -> dict[str, Any]:
        await parse_ollama(request, OllamaShow)
        model = _loaded_model(state)
        entry = await _model_entry(state)
        template = model.chat_template_text() or ""
        return {"modelfile": "", "parameters": "", "template": template, "details": entry["details"],
                "model_info": {"general.architecture": entry["details"]["family"]},
                "capabilities": ["completion"], "modified_at": entry["modified_at"]}

    @app.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_API_VERSION}


def _loaded_model(state: ServerState):
    """The served model; while it loads (or if it failed to), the server's 503."""
    return state.require_model()


def _openai_request(kind: type[ChatRequest] | type[CompletionRequest], body: OllamaRequest, **content: Any):
    """The server's own request for an Ollama one (Ollama's default sampling where it names none)."""
    options = body.options or OllamaOptions()
    fields: dict[str, Any] = {
        "model": body.model, "stream": body.stream,
        "temperature": OLLAMA_DEFAULT_TEMPERATURE if options.temperature is None else options.temperature,
        "top_p": OLLAMA_DEFAULT_TOP_P if options.top_p is None else options.top_p,
        "top_k": OLLAMA_DEFAULT_TOP_K if options.top_k is None else options.top_k,
        "seed": options.seed, "stop": options.stop or None,
        "presence_penalty": options.presence_penalty or 0.0, "frequency_penalty": options.frequency_penalty or 0.0,
        # None (given, so not the completions API's default of 16): up to the end of the context
        "max_tokens": options.num_predict if options.num_predict is not None and options.num_predict > 0 else None,
        **content}
    if body.format == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(body.format, dict):
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": body.format}}
    try:
        return kind.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise ApiError(400, f"{where}: {first.get('msg')}") from None


async def _answer(state: ServerState, request: Request, body: OllamaRequest, openai_body, kind: str):
    started = time.perf_counter_ns()
    plan, chunks = await local_generation(state, request, openai_body)
    model = _loaded_model(state)
    shape = _Shape(body.model, kind, plan, started)
    if body.stream:
        return SlotStreamingResponse(_ndjson(model, shape, chunks, request_id(request)), None, media_type=NDJSON)
    try:
        collected = await until_disconnect(request, _collect(chunks))
    finally:
        await chunks.aclose()
    text = "".join(chunk.text for chunk in collected)
    made = sum(visible(model, chunk) for chunk in collected)
    finish = next((c.finish_reason for c in reversed(collected) if c.finish_reason), "length")
    first_at = shape.first_at or time.perf_counter_ns()
    return JSONResponse({**shape.piece(text), **shape.final(finish, made, first_at)})


class _Shape:
    """Ollama's response objects for one request."""

    def __init__(self, model_name: str, kind: str, plan: GenerationPlan, started_ns: int) -> None:
        self.model_name, self.kind, self.plan, self.started = model_name, kind, plan, started_ns
        self.first_at: int | None = None

    def piece(self, text: str) -> dict[str, Any]:
        base = {"model": self.model_name, "created_at": _now(), "done": False}
        if self.kind == "chat":
            return {**base, "message": {"role": "assistant", "content": text}}
        return {**base, "response": text}

    def final(self, finish: str, made: int, first_at: int) -> dict[str, Any]:
        now = time.perf_counter_ns()
        return {"done": True, "done_reason": "length" if finish == "length" else "stop",
                "total_duration": now - self.started, "load_duration": 0,
                "prompt_eval_count": len(self.plan.prompt_ids), "prompt_eval_duration": first_at - self.started,
                "eval_count": made, "eval_duration": now - first_at}


async def _collect(chunks: AsyncIterator[GenerationChunk]) -> list[GenerationChunk]:
    return [chunk async for chunk in chunks]


async def _ndjson(model, shape: _Shape, chunks: AsyncIterator[GenerationChunk], request_ident: str
                  ) -> AsyncIterator[bytes]:
    made, finish = 0, "length"
    try:
        async for chunk in chunks:
            if shape.first_at is None and chunk.token_id is not None:
                shape.first_at = time.perf_counter_ns()
            made += visible(model, chunk)
            finish = chunk.finish_reason or finish
            if chunk.text:
                yield _line(shape.piece(chunk.text))
        yield _line({**shape.piece(""), **shape.final(finish, made, shape.first_at or time.perf_counter_ns())})
    except Exception as exc:  # the status line is sent: the stream ends with an error object, as Ollama's does
        yield _line({"error": stream_failure(exc, request_ident)[0]})
    finally:
        await chunks.aclose()


def _line(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, separators=(",", ":")) + "\n").encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


async def _model_entry(state) -> dict[str, Any]:
    model = _loaded_model(state)
    path = Path(model.runtime.path)
    size, digest, modified = await asyncio.to_thread(_file_facts, path)
    kind = "gguf" if path.is_file() else "onnx"
    return {"name": model.model_id, "model": model.model_id, "modified_at": modified, "size": size,
            "digest": digest, "details": {"format": kind, "family": _architecture(path) if kind == "gguf" else "",
                                          "families": None, "parameter_size": "",
                                          "quantization_level": _quantization(path)}}


@functools.cache
def _file_facts(path: Path) -> tuple[int, str, str]:
    """Bytes (a folder's: the sum of its files'), a digest and the modification time (the newest file's).

    The digest is NOT the file's sha256: hashing gigabytes would hold up the first /api/tags for seconds to minutes
    on an edge device. It is the sha256 of each file's path, size and modification time, so it is stable while the
    model is and changes when it does, which is what clients use it for (Ollama's own is a manifest's digest)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [file.stat() for file in files]
    identity = "".join(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n"
                       for file, stat in zip(files, stats, strict=True))
    modified = datetime.fromtimestamp(max(stat.st_mtime for stat in stats), timezone.utc)
    return (sum(stat.st_size for stat in stats), hashlib.sha256(identity.encode()).hexdigest(),
            modified.isoformat().replace("+00:00", "Z"))


@functools.cache
def _architecture(path: Path) -> str:
    from edgepack.core.gguf_file import metadata_value, open_reader

    return str(metadata_value(open_reader(path), "general.architecture", ""))


def _quantization(path: Path) -> str:
    """From the variant's name (gguf-q4_k_m.gguf -> Q4_K_M), as edgepack names its variants."""
    stem = path.stem if path.is_file() else path.name
    return stem.split("-", 1)[1].upper() if "-" in stem else ""
