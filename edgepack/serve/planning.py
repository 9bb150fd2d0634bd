"""Request planning, written once for every API: a place in the local queue (503 when it is full, before any work),
then the request checked and its prompt tokenized on a worker thread (limits, the output grammar compiled, the
prompt prepared in linear time), stopped as soon as the client goes away."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from fastapi import Request

from edgepack.core.errors import ApiError, EdgepackError
from edgepack.serve.admission import Slot
from edgepack.serve.engine_stream import ClientGone, generation_chunks, until_disconnect
from edgepack.serve.protocol import ChatRequest, CompletionRequest
from edgepack.serve.responses import GenerationPlan, plan_request
from edgepack.serve.session import ModelSession
from edgepack.serve.state import ServerState
from runtimes.base import GenerationChunk
from runtimes.prompt_tokens import PromptCancelled


async def plan_for(request: Request, model: ModelSession, body: ChatRequest | CompletionRequest) -> GenerationPlan:
    """The request's plan; a 400 for what the server or model cannot do, ClientGone when the client left while it
    was made (the worker thread stops at its next step)."""
    cancel = threading.Event()
    try:
        return await until_disconnect(request, asyncio.to_thread(plan_request, model, body, cancel))
    except PromptCancelled as exc:
        raise ClientGone() from exc
    except ApiError:
        raise
    except EdgepackError as exc:
        raise ApiError(400, str(exc)) from exc
    finally:
        cancel.set()


async def local_generation(state: ServerState, request: Request, body: ChatRequest | CompletionRequest
                           ) -> tuple[GenerationPlan, AsyncIterator[GenerationChunk]]:
    """A request answered by the local model: the plan and its chunks. The chunks hold the request's admission slot
    until they end or are closed (`aclose()` them when the client goes away); a full server raises a 503 before
    anything is tokenized, a bad request a 400."""
    model = state.require_model()
    slot = state.local.take()
    try:
        plan = await plan_for(request, model, body)
    except BaseException:
        slot.release()
        raise
    state.metrics.count_route("local")
    return plan, _owned(state, model, plan, slot)


async def _owned(state: ServerState, model: ModelSession, plan: GenerationPlan,
                 slot: Slot) -> AsyncIterator[GenerationChunk]:
    try:
        async for chunk in generation_chunks(state, model, plan):
            yield chunk
    finally:
        slot.release()
