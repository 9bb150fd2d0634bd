"""OpenAI's API: `/v1/models`, `/v1/chat/completions` and `/v1/completions`, each request routed by the policy (the
local model, the upstream one by rule, or `auto`: the local answer first, upstream when its confidence is low)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgepack.core.errors import ApiError, UpstreamError, error_body
from edgepack.serve.admission import Slot
from edgepack.serve.engine_stream import (
    SlotStreamingResponse,
    generate_all,
    generation_chunks,
    merge_choices,
    stream_failure,
    until_disconnect,
)
from edgepack.serve.http_errors import request_id
from edgepack.serve.planning import plan_for
from edgepack.serve.protocol import ChatRequest, CompletionRequest, parse_body
from edgepack.serve.responses import GenerationPlan, StreamEvents, sse, visible, whole_response
from edgepack.serve.router import ROUTE_HEADER, confidence_of, low_confidence, rule_reason, upstream_body
from edgepack.serve.session import ModelSession
from edgepack.serve.state import ServerState
from runtimes.base import GenerationChunk


def add_openai_routes(app: FastAPI, state: ServerState) -> None:
    config = state.config

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        loaded = state.require_model()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "edgepack"}
                for name in dict.fromkeys((loaded.model_id, *config.model_aliases))]
        if config.router.policy != "local":
            data.append({"id": config.router.upstream_model, "object": "model", "created": 0, "owned_by": "upstream"})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _serve(state, request, await parse_body(request, ChatRequest), "/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(state, request, await parse_body(request, CompletionRequest), "/completions")


def _prompt_text(body: ChatRequest | CompletionRequest) -> str:
    if isinstance(body, ChatRequest):
        return "\n".join(m.text() for m in body.messages)
    return body.text()


async def _serve(state: ServerState, request: Request, body: ChatRequest | CompletionRequest, route: str):
    """Route one request: by rule to upstream, or locally (with a confidence check under `auto`)."""
    model = state.require_model()
    router = state.config.router
    with state.local.take() as slot:  # a full server answers 503 before tokenizing anything
        too_long: ApiError | None = None
        try:
            plan: GenerationPlan | None = await plan_for(request, model, body)
        except ApiError as exc:
            if exc.body["error"]["code"] != "context_length_exceeded" or router.policy == "local":
                raise
            plan, too_long = None, exc
        reason = await asyncio.to_thread(rule_reason, router, body.model, _prompt_text(body), plan is not None) \
            if router.policy != "local" else None
        if reason is not None:
            slot.release()  # upstream requests count against their own bound
            return await _upstream_or_local(state, request, model, plan, body, route, too_long)
        assert plan is not None
        if router.policy != "auto":
            return await _answer_locally(state, request, model, plan, body.stream, "local", slot)
        if plan.choices > 1:
            raise ApiError(400, "n: under routing policy auto each answer is judged on its own; ask for one choice",
                           param="n")
        # auto: the whole local answer first, with its log-probabilities, to judge it
        scored = replace(plan, options=replace(plan.options, logprobs=True))
        chunks = await until_disconnect(request, generate_all(state, model, scored))
        confidence = confidence_of([c.logprob for c in chunks if visible(model, c) and c.logprob is not None])
        doubt = low_confidence(router, confidence)
        route_name = "local"
        if doubt is not None and state.upstream is not None:
            slot.release()
            try:
                return await _from_upstream(state, request, route, body)
            except UpstreamError:
                route_name = "local-fallback"
        state.metrics.count_route(route_name)
        ident = _new_id(plan)
        if body.stream:
            return _streaming(state, request, model, plan, ident, [_replay(chunks)], route_name, slot)
        return JSONResponse(whole_response(model, plan, ident, [chunks]), headers={ROUTE_HEADER: route_name})


async def _replay(chunks: list[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    for chunk in chunks:
        yield chunk


async def _from_upstream(state: ServerState, request: Request, route: str, body: ChatRequest | CompletionRequest):
    assert state.upstream is not None
    upstream = state.upstream
    forwarded = upstream_body(body, state.config.router)  # a 400 for what upstream would be asked too much of
    with state.remote.take() as slot:
        if body.stream:
            relay = await until_disconnect(request, upstream.open_stream(route, forwarded))
            state.metrics.count_route("remote")
            return SlotStreamingResponse(relay, slot.keep(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", ROUTE_HEADER: "remote"})
        answer = await until_disconnect(request, upstream.complete(route, forwarded))
    state.metrics.count_route("remote")
    return JSONResponse(answer, headers={ROUTE_HEADER: "remote"})


async def _upstream_or_local(state: ServerState, request: Request, model: ModelSession, plan: GenerationPlan | None,
                             body: ChatRequest | CompletionRequest, route: str, too_long: ApiError | None):
    """A request the rules send upstream; when upstream cannot answer, the local model does (if it can)."""
    try:
        return await _from_upstream(state, request, route, body)
    except UpstreamError as exc:
        if plan is None:
            assert too_long is not None
            raise ApiError(502, f"{exc}, and the prompt is too long for the local model: "
                                f"{too_long.body['error']['message']}", "server_error",
                           code="upstream_unavailable") from exc
    with state.local.take() as slot:
        return await _answer_locally(state, request, model, plan, body.stream, "local-fallback", slot)


def _new_id(plan: GenerationPlan) -> str:
    return ("chatcmpl-" if plan.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


async def _answer_locally(state: ServerState, request: Request, model: ModelSession, plan: GenerationPlan,
                          stream: bool, route_name: str, slot: Slot):
    """Generate with the local model (a live stream, or the whole answer), marked with how it was routed."""
    state.metrics.count_route(route_name)
    ident = _new_id(plan)
    choices = plan.per_choice()
    if stream:
        return _streaming(state, request, model, plan, ident,
                          [generation_chunks(state, model, one) for one in choices], route_name, slot)

    async def all_choices() -> list[list[GenerationChunk]]:
        return list(await asyncio.gather(*(generate_all(state, model, one) for one in choices)))

    answers = await until_disconnect(request, all_choices())
    return JSONResponse(whole_response(model, plan, ident, answers), headers={ROUTE_HEADER: route_name})


def _streaming(state: ServerState, request: Request, model: ModelSession, plan: GenerationPlan, ident: str,
               choices: list[AsyncIterator[GenerationChunk]], route_name: str, slot: Slot) -> StreamingResponse:
    return SlotStreamingResponse(_stream_events(model, plan, ident, choices, request_id(request)), slot.keep(),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", ROUTE_HEADER: route_name})


async def _stream_events(model: ModelSession, plan: GenerationPlan, ident: str,
                         choices: list[AsyncIterator[GenerationChunk]], request_ident: str) -> AsyncIterator[bytes]:
    """The events of every choice, as their chunks come (each event carries its choice's index)."""
    events = [StreamEvents(model, plan, ident, index) for index in range(len(choices))]
    finishes = ["length"] * len(choices)
    made = 0
    merged = merge_choices(choices)
    try:
        if plan.kind == "chat":
            for choice_events in events:
                yield choice_events.role()
        async for index, chunk in merged:
            if chunk is None:  # that choice has ended
                yield events[index].finish(finishes[index])
                continue
            made += visible(model, chunk)
            piece = events[index].piece(chunk)
            if piece is not None:
                yield piece
            finishes[index] = chunk.finish_reason or finishes[index]
        if plan.include_usage:
            yield events[0].usage(made)
        yield events[0].done()
    except Exception as exc:  # the headers (200) are sent: the stream ends with an error event instead
        message, code = stream_failure(exc, request_ident)
        yield sse(error_body(message, "invalid_request_error" if isinstance(exc, ApiError) else "server_error",
                             code=code))
        yield events[0].done()
    finally:
        await merged.aclose()  # now, not when garbage is collected: frees the engine
