"""Generations on the local engine, written once for every API: the chunks of one generation (holding a place among
those that run at once, cancelled when the caller leaves), several choices merged as they come, a whole answer
that stops when its client goes, and a streamed response that owns its request's admission slot."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from edgepack.core.errors import ApiError, OutputConstraintError
from edgepack.serve.admission import Slot
from edgepack.serve.http_errors import log
from edgepack.serve.responses import GenerationPlan, visible
from edgepack.serve.session import ModelSession
from edgepack.serve.state import ServerState
from runtimes.base import GenerationChunk

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


def unsatisfiable(exc: OutputConstraintError) -> ApiError:
    return ApiError(400, f"the answer cannot go on within the requested format: {exc}", param="response_format",
                    code="unsatisfiable_output_constraint")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client closes its connection first, `work` is cancelled and ClientGone raised."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        for pending in (task, watcher):
            pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task  # the work has stopped (a generation: the engine is free) before the slot is released


async def generation_chunks(state: ServerState, model: ModelSession, plan: GenerationPlan
                            ) -> AsyncIterator[GenerationChunk]:
    """Run the generation (on the engine's own thread, or else on a worker thread), holding a place among the
    generations that run at once; yield its chunks. Leaving early (a client that went away) cancels the generation
    at the next token. A generation its grammar cannot continue raises a 400 (ApiError)."""
    async with state.engine:  # the generations that run at once; the rest wait here, first come first served
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down)
                cancel.set()

        def emit(item: GenerationChunk | BaseException) -> None:  # called on the engine's thread
            put(item)
            if isinstance(item, BaseException) or item.finish_reason is not None:
                put(done)

        def produce() -> None:
            try:
                for chunk in model.stream_ids(plan.prompt_ids, plan.options, cancel):
                    put(chunk)
            except Exception as exc:
                put(exc)
            finally:
                put(done)

        started = time.perf_counter()
        ended = False
        worker = None if model.submit(plan.prompt_ids, plan.options, emit, cancel) else \
            loop.run_in_executor(state.generations, produce)
        first_at, made = None, 0
        try:
            while True:
                item = await queue.get()
                if item is done:
                    ended = True
                    break
                if isinstance(item, OutputConstraintError):
                    raise unsatisfiable(item) from item
                if isinstance(item, Exception):
                    raise item
                if item.token_id is not None and first_at is None:
                    first_at = time.perf_counter()
                    state.metrics.observe_ttft(first_at - started)
                made += visible(model, item)
                yield item
        finally:
            cancel.set()
            # Starlette cancels a stream whose client left through an anyio cancel scope, which cancels every await
            # in it again: shielded, these waits run to the end, so the slot is released only once the engine is
            # free (the generation stops at its next token)
            with anyio.CancelScope(shield=True):
                if worker is not None:
                    await worker  # the thread has stopped
                while not ended:  # the engine has let go of the generation once it says it ended
                    ended = await queue.get() is done
            state.metrics.count_tokens(len(plan.prompt_ids), made,
                                       time.perf_counter() - first_at if first_at else None)


async def generate_all(state: ServerState, model: ModelSession, plan: GenerationPlan) -> list[GenerationChunk]:
    return [chunk async for chunk in generation_chunks(state, model, plan)]


async def merge_choices(streams: list[AsyncIterator[GenerationChunk]]
                        ) -> AsyncIterator[tuple[int, GenerationChunk | None]]:
    """(choice index, chunk) from several streams as they come, and (index, None) when one ends. Leaving early
    closes every stream."""
    if len(streams) == 1:
        try:
            async for chunk in streams[0]:
                yield 0, chunk
            yield 0, None
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, GenerationChunk | None] | BaseException] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[GenerationChunk]) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((index, chunk))
            queue.put_nowait((index, None))
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    pumps = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        ended = 0
        while ended < len(streams):
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            ended += item[1] is None
            yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


class SlotStreamingResponse(StreamingResponse):
    """A streamed answer that owns its request's slot: when the stream ends, however it ends (done, failed, the
    client gone before or during it), the generation is closed (the engine freed) and then the slot released."""

    def __init__(self, content: AsyncIterator[bytes], slot: Slot | None, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.slot = slot  # None: the content holds its own slot

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except OSError:  # the client went away while we wrote to it
            pass
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                if self.slot is not None:
                    self.slot.release()


def stream_failure(exc: Exception, request_id: str) -> tuple[str, str]:
    """(message, code) of the error event that ends a stream whose generation failed after its 200 was sent: a
    client's mistake (ApiError) as it is; a failure of our own logged with the request's id, which the client gets
    instead of its text."""
    if isinstance(exc, ApiError):
        return exc.body["error"]["message"], exc.body["error"]["code"] or "generation_failed"
    log.error("request %s: the generation failed midway", request_id, exc_info=exc)
    return f"generation failed midway (request id {request_id})", "generation_failed"
