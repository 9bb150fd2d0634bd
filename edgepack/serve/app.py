"""The local OpenAI-compatible server (FastAPI + uvicorn) over any variant or verified bundle.

As many generations run at once as the engine takes (llama.cpp batches `--parallel` of them; other engines run
one); further requests wait in a bounded queue, first come first served, and past its bound the answer is 503
with Retry-After. Ollama's API (edgepack.serve.ollama) and the chat page at / (edgepack.serve.chat_page) are
served beside the OpenAI routes. A request holds its place from before its prompt is tokenized; a client that goes
away (before its stream starts, mid-stream, or while waiting for a whole answer) frees it and cancels its
generation at the next token. Bodies are parsed off the event loop when large. Errors use OpenAI's JSON error
shape, and an engine failure is a 500 in that shape too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from edgepack.core.errors import ApiError, EdgepackError, UpstreamError, error_body
from edgepack.serve.admission import Slot, Slots
from edgepack.serve.chat_page import add_chat_page
from edgepack.serve.metrics import Metrics
from edgepack.serve.middleware import CLIENT_CLOSED, BodyLimit, RequestGate
from edgepack.serve.ollama import LocalAnswers, add_ollama_routes
from edgepack.serve.protocol import ChatRequest, CompletionRequest
from edgepack.serve.responses import GenerationPlan, StreamEvents, plan_request, sse, visible, whole_response
from edgepack.serve.router import (
    ROUTE_HEADER,
    RouterConfig,
    Upstream,
    confidence_of,
    is_loopback_host,
    low_confidence,
    rule_reason,
)
from edgepack.serve.session import ModelSession, ServeDefaults, open_session
from runtimes.base import Device, GenerationChunk

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
INLINE_PARSE_BYTES = 64 * 1024  # larger bodies are parsed on a worker thread, so /health stays quick
T = TypeVar("T")
Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 16  # requests waiting for the engine beyond the one it runs
    max_upstream: int = 16  # requests routed upstream at once
    retry_after_s: int = 2
    router: RouterConfig = field(default_factory=RouterConfig)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413 before anything parses them
    # more names the local model answers to in /v1/models (it answers a request naming any model but the upstream's)
    model_aliases: tuple[str, ...] = ()
    # Host headers answered besides this machine's own names; on a loopback address nothing else is (a web page
    # cannot reach the server through a DNS name it controls), elsewhere anything is unless names are given
    allowed_hosts: tuple[str, ...] = ()

    def host_allowed(self, host_header: str) -> bool:
        name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
        name = name.strip("[]").lower()
        if is_loopback_host(name) or name in (h.lower() for h in self.allowed_hosts):
            return True
        return not self.allowed_hosts and not is_loopback_host(self.host)

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise EdgepackError(f"--max-queue {self.max_queue}: must be 0 or more")
        if self.max_upstream < 1:
            raise EdgepackError(f"--max-upstream {self.max_upstream}: must be 1 or more")
        if self.max_body_bytes < 1024:
            raise EdgepackError(f"the request body limit ({self.max_body_bytes} bytes) must be at least 1 KiB")


def read_api_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The key given, or the first line of a key file (so it stays out of the process list)."""
    if api_key_file is None:
        return api_key
    if not Path(api_key_file).is_file():
        raise EdgepackError(f"API key file {api_key_file} does not exist")
    key = Path(api_key_file).read_text().strip()
    if not key:
        raise EdgepackError(f"API key file {api_key_file} is empty")
    return key


class ServerState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model: ModelSession | None = None
        self.load_error: str | None = None
        self.engine = asyncio.Semaphore(1)  # generations at once: the model's concurrency, once it is loaded
        self.generations: ThreadPoolExecutor | None = None  # a thread for each generation that runs
        self.metrics = Metrics()
        retry = config.retry_after_s
        self.local = Slots(1 + config.max_queue, lambda n: f"the server is busy: {n} requests are running or queued "
                           f"(the queue holds {config.max_queue}); retry after {retry} s", "queue_full", retry,
                           on_full=self.metrics.count_busy)
        self.remote = Slots(config.max_upstream, lambda n: f"the server is busy: {n} requests to the upstream model "
                            f"are in flight (--max-upstream {config.max_upstream}); retry after {retry} s",
                            "upstream_busy", retry, on_full=self.metrics.count_busy)
        self.upstream = Upstream(config.router) if config.router.policy != "local" else None

    def set_model(self, model: ModelSession) -> None:
        """The loaded model: as many generations run at once as it takes; the queue waits beyond those."""
        self.engine = asyncio.Semaphore(model.concurrency)
        self.generations = ThreadPoolExecutor(max_workers=model.concurrency, thread_name_prefix="edgepack-generate")
        self.local.limit = model.concurrency + self.config.max_queue
        if model.runtime.generates_concurrently:
            counters = model.runtime.scheduler().counters
            self.metrics.watch_batching(lambda: (counters.reused_tokens, counters.steps))
        self.model = model  # last: requests see the model only when all of the above is ready

    @property
    def in_flight(self) -> int:
        """Local generations running or waiting for the engine."""
        return self.local.in_use

    def require_model(self) -> ModelSession:
        if self.model is None:
            raise ApiError(503, self.load_error or "the model is still loading; GET /health says when it is ready",
                           "server_error", code="model_not_ready", headers={"Retry-After": "1"})
        return self.model


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


def create_app(config: ServerConfig, loader: Callable[[], ModelSession] | None = None,
               model: ModelSession | None = None) -> FastAPI:
    """`loader` runs in a thread once the server is up (so /health can say 'loading'); or pass a loaded model."""
    config.router.check_ready()
    state = ServerState(config)
    if model is not None:
        state.set_model(model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if loader is not None and state.model is None:
            def load() -> None:
                try:
                    state.set_model(loader())
                except Exception as exc:  # the server stays up and says why on /health
                    state.load_error = f"the model failed to load: {exc}"
            threading.Thread(target=load, name="edgepack-load", daemon=True).start()
        yield
        if state.upstream is not None:
            await state.upstream.close()
        if state.generations is not None:
            state.generations.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="edgepack", lifespan=lifespan)
    app.state.edgepack = state

    @functools.cache
    def served_paths() -> frozenset[str]:
        return frozenset(getattr(route, "path", "") for route in app.routes)

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestGate, host_allowed=config.host_allowed, api_key=config.api_key, metrics=state.metrics,
                       served_paths=served_paths)  # outermost: refused requests are never read

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('msg')}"
        elif first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {where}"
        else:
            message = f"{where or 'body'}: {first.get('msg')}"
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the request counter does

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"the server failed to answer: {type(exc).__name__}: {exc}", "server_error",
                                       code="internal_error"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.model is not None:
            runtime = state.model.runtime
            return JSONResponse({"status": "ok", "model": state.model.model_id, "device": runtime.device,
                                 "device_note": state.model.device_note, "routing": state.config.router.policy,
                                 "parallel": state.model.concurrency, "context": runtime.context_length,
                                 "chat_template": runtime.chat_template_source,
                                 "answers": state.metrics.answers(), "local_share": state.metrics.local_share()})
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        running = state.model.concurrency if state.model is not None else 1
        return PlainTextResponse(state.metrics.render(state.in_flight, max(0, state.in_flight - running)),
                                 media_type="text/plain; version=0.0.4")

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
        return await _serve(state, request, await _parse(request, ChatRequest), "/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(state, request, await _parse(request, CompletionRequest), "/completions")

    add_ollama_routes(app, state, LocalAnswers(local_generation, until_disconnect, SlotStreamingResponse))
    add_chat_page(app)

    return app


async def _parse(request: Request, kind: type[Body]) -> Body:
    """The body as `kind`; a large one is parsed on a worker thread. Mistakes become 400s (RequestValidationError)."""
    raw = await request.body()

    def parse() -> Body:
        try:
            return kind.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None

    return await asyncio.to_thread(parse) if len(raw) > INLINE_PARSE_BYTES else parse()


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
            await task  # the generation has stopped and the engine is free before the slot is


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
            plan: GenerationPlan | None = await asyncio.to_thread(plan_request, model, body)
        except ApiError as exc:
            if exc.body["error"]["code"] != "context_length_exceeded" or router.policy == "local":
                raise
            plan, too_long = None, exc
        except EdgepackError as exc:
            raise ApiError(400, str(exc)) from exc
        forwarded = body.model_dump(exclude_none=True, by_alias=True)
        reason = await asyncio.to_thread(rule_reason, router, body.model, _prompt_text(body), plan is not None) \
            if router.policy != "local" else None
        if reason is not None:
            slot.release()  # upstream requests count against their own bound
            return await _upstream_or_local(state, request, model, plan, body, route, forwarded, too_long)
        assert plan is not None
        if router.policy != "auto":
            return await _answer_locally(state, request, model, plan, body.stream, "local", slot)
        if plan.choices > 1:
            raise ApiError(400, "n: under routing policy auto each answer is judged on its own; ask for one choice",
                           param="n")
        # auto: the whole local answer first, with its log-probabilities, to judge it
        scored = replace(plan, options=replace(plan.options, logprobs=True))
        chunks = await until_disconnect(request, _generate_all(state, model, scored))
        confidence = confidence_of([c.logprob for c in chunks if visible(model, c) and c.logprob is not None])
        doubt = low_confidence(router, confidence)
        route_name = "local"
        if doubt is not None and state.upstream is not None:
            slot.release()
            try:
                return await _from_upstream(state, request, route, forwarded, body.stream)
            except UpstreamError:
                route_name = "local-fallback"
        state.metrics.count_route(route_name)
        ident = _new_id(plan)
        if body.stream:
            return _streaming(state, model, plan, ident, [_replay(chunks)], route_name, slot)
        return JSONResponse(whole_response(model, plan, ident, [chunks]), headers={ROUTE_HEADER: route_name})


async def _replay(chunks: list[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    for chunk in chunks:
        yield chunk


async def _from_upstream(state: ServerState, request: Request, route: str, forwarded: dict[str, Any], stream: bool):
    assert state.upstream is not None
    upstream = state.upstream
    with state.remote.take() as slot:
        if stream:
            relay = await until_disconnect(request, upstream.open_stream(route, forwarded))
            state.metrics.count_route("remote")
            return SlotStreamingResponse(relay, slot.keep(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", ROUTE_HEADER: "remote"})
        answer = await until_disconnect(request, upstream.complete(route, forwarded))
    state.metrics.count_route("remote")
    return JSONResponse(answer, headers={ROUTE_HEADER: "remote"})


async def _upstream_or_local(state: ServerState, request: Request, model: ModelSession, plan: GenerationPlan | None,
                             body: ChatRequest | CompletionRequest, route: str, forwarded: dict[str, Any],
                             too_long: ApiError | None):
    """A request the rules send upstream; when upstream cannot answer, the local model does (if it can)."""
    try:
        return await _from_upstream(state, request, route, forwarded, body.stream)
    except UpstreamError as exc:
        if plan is None:
            assert too_long is not None
            raise ApiError(502, f"{exc}, and the prompt is too long for the local model: "
                                f"{too_long.body['error']['message']}", "server_error",
                           code="upstream_unavailable") from exc
    with state.local.take() as slot:
        return await _answer_locally(state, request, model, plan, body.stream, "local-fallback", slot)


async def local_generation(state: ServerState, body: ChatRequest | CompletionRequest
                           ) -> tuple[GenerationPlan, AsyncIterator[GenerationChunk]]:
    """A request answered by the local model, for the other APIs (Ollama's) that speak through it: the plan and its
    chunks. The chunks hold the request's admission slot until they end or are closed (`aclose()` them when the
    client goes away); a full server raises a 503 before anything is tokenized, a bad request a 400."""
    model = state.require_model()
    slot = state.local.take()
    try:
        plan = await asyncio.to_thread(plan_request, model, body)
    except EdgepackError as exc:
        slot.release()
        raise ApiError(400, str(exc)) from exc
    except BaseException:
        slot.release()
        raise
    state.metrics.count_route("local")

    async def owned() -> AsyncIterator[GenerationChunk]:
        try:
            async for chunk in _chunks(state, model, plan):
                yield chunk
        finally:
            slot.release()

    return plan, owned()


def _new_id(plan: GenerationPlan) -> str:
    return ("chatcmpl-" if plan.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


async def _answer_locally(state: ServerState, request: Request, model: ModelSession, plan: GenerationPlan,
                          stream: bool, route_name: str, slot: Slot):
    """Generate with the local model (a live stream, or the whole answer), marked with how it was routed."""
    state.metrics.count_route(route_name)
    ident = _new_id(plan)
    choices = plan.per_choice()
    if stream:
        return _streaming(state, model, plan, ident, [_chunks(state, model, one) for one in choices], route_name,
                          slot)

    async def all_choices() -> list[list[GenerationChunk]]:
        return list(await asyncio.gather(*(_generate_all(state, model, one) for one in choices)))

    answers = await until_disconnect(request, all_choices())
    return JSONResponse(whole_response(model, plan, ident, answers), headers={ROUTE_HEADER: route_name})


class SlotStreamingResponse(StreamingResponse):
    """A streamed answer that owns its request's slot: when the stream ends, however it ends (done, failed, the
    client gone before or during it), the generation is closed (the engine freed) and then the slot released."""

    def __init__(self, content: AsyncIterator[bytes], slot: Slot | None, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.slot = slot  # None: the content holds its own slot (local_generation's chunks)

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


def _streaming(state: ServerState, model: ModelSession, plan: GenerationPlan, ident: str,
               choices: list[AsyncIterator[GenerationChunk]], route_name: str, slot: Slot) -> StreamingResponse:
    return SlotStreamingResponse(_stream_events(state, model, plan, ident, choices), slot.keep(),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", ROUTE_HEADER: route_name})


async def _generate_all(state: ServerState, model: ModelSession, plan: GenerationPlan) -> list[GenerationChunk]:
    chunks: list[GenerationChunk] = []
    async for chunk in _chunks(state, model, plan):
        chunks.append(chunk)
    return chunks


async def _chunks(state: ServerState, model: ModelSession, plan: GenerationPlan) -> AsyncIterator[GenerationChunk]:
    """Run the generation (on the engine's own thread, or else on a worker thread), holding a place among the
    generations that run at once; yield its chunks. Leaving early (a client that went away) cancels the generation
    at the next token."""
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


async def _stream_events(state: ServerState, model: ModelSession, plan: GenerationPlan, ident: str,
                         choices: list[AsyncIterator[GenerationChunk]]) -> AsyncIterator[bytes]:
    """The events of every choice, as their chunks come (each event carries its choice's index)."""
    events = [StreamEvents(model, plan, ident, index) for index in range(len(choices))]
    finishes = ["length"] * len(choices)
    made = 0
    merged = _merge(choices)
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
        yield sse(error_body(f"generation failed midway: {exc}", "server_error", code="generation_failed"))
        yield events[0].done()
    finally:
        await merged.aclose()  # now, not when garbage is collected: frees the engine


async def _merge(streams: list[AsyncIterator[GenerationChunk]]
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


@dataclass
class RunningServer:
    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _uvicorn_server(app: FastAPI, config: ServerConfig):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                         access_log=False, lifespan="on"))


def start_server_thread(model: ModelSession, config: ServerConfig) -> RunningServer:
    """Serve `model` from a thread of this process (port 0: any free port); returns once it accepts requests."""
    server = _uvicorn_server(create_app(config, model=model), config)
    thread = threading.Thread(target=server.run, name="edgepack-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise EdgepackError(f"the server did not start on {config.host}:{config.port}")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(url=f"http://{config.host}:{port}", server=server, thread=thread)


def run_server(model: ModelSession, config: ServerConfig) -> None:
    _uvicorn_server(create_app(config, model=model), config).run()


def serve_path(defaults: ServeDefaults, config: ServerConfig, threads: int | None = None,
               context: int | None = None, device: Device | None = None, parallel: int | None = None,
               chat_template: str | None = None) -> None:
    """`edgepack serve`: `defaults` come from `defaults_for`, which refused a bundle that fails verification before
    anything listens; start listening, and load the model in the background."""
    app = create_app(config, loader=lambda: open_session(defaults, threads=threads, context=context, device=device,
                                                         parallel=parallel, chat_template=chat_template))
    _uvicorn_server(app, config).run()
