"""The local OpenAI-compatible server (FastAPI + uvicorn) over any variant or verified bundle.

One generation runs on the engine at a time; further requests wait in a bounded queue, and past its bound the
answer is 503 with Retry-After. A streaming client that disconnects cancels its generation. Errors use OpenAI's
JSON error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from edgepack.core.errors import ApiError, EdgepackError, UpstreamError, error_body
from edgepack.serve.metrics import Metrics
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


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413 in OpenAI's error shape, by its Content-Length or, for a
    chunked body, as soon as the bytes read pass the limit; a body within it is handed on as it came."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        response = JSONResponse(error_body(f"the request body is larger than this server accepts "
                                           f"({self.max_bytes} bytes; see --max-body-mb)",
                                           code="request_too_large"), status_code=413)
        await response({"type": "http"}, None, send)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 16  # requests waiting for the engine beyond the one it runs
    retry_after_s: int = 2
    router: RouterConfig = field(default_factory=RouterConfig)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413 before anything parses them
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
        self.engine = asyncio.Lock()
        self.in_flight = 0  # running + waiting
        self.metrics = Metrics()
        self.upstream = Upstream(config.router) if config.router.policy != "local" else None

    def require_model(self) -> ModelSession:
        if self.model is None:
            raise ApiError(503, self.load_error or "the model is still loading; GET /health says when it is ready",
                           "server_error", code="model_not_ready", headers={"Retry-After": "1"})
        return self.model


def create_app(config: ServerConfig, loader: Callable[[], ModelSession] | None = None,
               model: ModelSession | None = None) -> FastAPI:
    """`loader` runs in a thread once the server is up (so /health can say 'loading'); or pass a loaded model."""
    config.router.check_ready()
    state = ServerState(config)
    state.model = model

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if loader is not None and state.model is None:
            def load() -> None:
                try:
                    state.model = loader()
                except Exception as exc:  # the server stays up and says why on /health
                    state.load_error = f"the model failed to load: {exc}"
            threading.Thread(target=load, name="edgepack-load", daemon=True).start()
        yield
        if state.upstream is not None:
            await state.upstream.close()

    app = FastAPI(title="edgepack", lifespan=lifespan)
    app.state.edgepack = state
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

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

    @functools.cache
    def served_paths() -> frozenset[str]:
        return frozenset(getattr(route, "path", "") for route in app.routes)

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        route = request.scope["path"]  # never request.url: it is rebuilt from the Host header a client sends
        label = route if route in served_paths() else "other"  # one series per route, not per path a client tries
        host = request.headers.get("host", "")
        if not config.host_allowed(host):
            state.metrics.count_request(label, 403)
            return JSONResponse(error_body(f"Host {host!r} is not this server's address; start the server with "
                                           "--allowed-host NAME to answer requests for that name",
                                           code="host_not_allowed"), status_code=403)
        if config.api_key is not None and route.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {config.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                state.metrics.count_request(label, 401)
                return JSONResponse(error_body("Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                               code="invalid_api_key"), status_code=401)
        response = await call_next(request)
        state.metrics.count_request(label, response.status_code)
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.model is not None:
            return JSONResponse({"status": "ok", "model": state.model.model_id, "device": state.model.runtime.device,
                                 "device_note": state.model.device_note, "routing": state.config.router.policy,
                                 "answers": state.metrics.answers(), "local_share": state.metrics.local_share()})
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(state.in_flight, max(0, state.in_flight - 1)),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        loaded = state.require_model()
        data = [{"id": loaded.model_id, "object": "model", "created": 0, "owned_by": "edgepack"}]
        if config.router.policy != "local":
            data.append({"id": config.router.upstream_model, "object": "model", "created": 0, "owned_by": "upstream"})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await _serve(state, body, "/chat/completions")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(state, body, "/completions")

    return app


def _refuse_when_full(state: ServerState) -> None:
    if state.in_flight >= 1 + state.config.max_queue:
        state.metrics.count_busy()
        raise ApiError(503, f"the server is busy: {state.in_flight} requests are running or queued (the queue holds "
                            f"{state.config.max_queue}); retry after {state.config.retry_after_s} s",
                       "server_error", code="queue_full", headers={"Retry-After": str(state.config.retry_after_s)})


def _admit(state: ServerState) -> None:
    _refuse_when_full(state)
    state.in_flight += 1


def _prompt_text(body: ChatRequest | CompletionRequest) -> str:
    if isinstance(body, ChatRequest):
        return "\n".join(m.text() for m in body.messages)
    return body.text()


async def _serve(state: ServerState, body: ChatRequest | CompletionRequest, route: str):
    """Route one request: by rule to upstream, or locally (with a confidence check under `auto`)."""
    model = state.require_model()
    _refuse_when_full(state)  # before any tokenizing: a full server answers 503 cheaply
    router = state.config.router
    served = {model.model_id} | ({router.upstream_model} if router.policy != "local" else set())
    if body.model not in served:
        raise ApiError(404, f"The model '{body.model}' does not exist; this server serves "
                            f"{', '.join(repr(m) for m in sorted(served))} (GET /v1/models)", param="model",
                       code="model_not_found")
    too_long: ApiError | None = None
    try:
        plan: GenerationPlan | None = await asyncio.to_thread(plan_request, model, body)
    except ApiError as exc:
        if exc.body["error"]["code"] != "context_length_exceeded" or router.policy == "local":
            raise
        plan, too_long = None, exc
    except EdgepackError as exc:
        raise ApiError(400, str(exc)) from exc
    forwarded = body.model_dump(exclude_none=True)
    reason = rule_reason(router, body.model, _prompt_text(body), fits_locally=plan is not None)
    if reason is not None:
        return await _upstream_or_local(state, model, plan, body, route, forwarded, too_long)
    assert plan is not None
    if router.policy != "auto":
        return await _answer_locally(state, model, plan, body.stream, "local")
    # auto: the whole local answer first, with its log-probabilities, to judge it
    _admit(state)
    ident = _new_id(plan)
    scored = replace(plan, options=replace(plan.options, logprobs=True))
    try:
        chunks = await _generate_all(state, model, scored)
    finally:
        state.in_flight -= 1
    confidence = confidence_of([c.logprob for c in chunks if visible(model, c) and c.logprob is not None])
    doubt = low_confidence(router, confidence)
    if doubt is not None and state.upstream is not None:
        try:
            return await _from_upstream(state, route, forwarded, body.stream)
        except UpstreamError:
            route_name = "local-fallback"
    else:
        route_name = "local"
    state.metrics.count_route(route_name)
    if body.stream:
        state.in_flight += 1  # released by the stream, like a live one
        return _streaming(state, model, plan, ident, _replay(chunks), route_name)
    return JSONResponse(whole_response(model, plan, ident, chunks), headers={ROUTE_HEADER: route_name})


async def _replay(chunks: list[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    for chunk in chunks:
        yield chunk


async def _from_upstream(state: ServerState, route: str, forwarded: dict[str, Any], stream: bool):
    assert state.upstream is not None
    if stream:
        relay = await state.upstream.open_stream(route, forwarded)
        state.metrics.count_route("remote")
        return StreamingResponse(relay, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", ROUTE_HEADER: "remote"})
    answer = await state.upstream.complete(route, forwarded)
    state.metrics.count_route("remote")
    return JSONResponse(answer, headers={ROUTE_HEADER: "remote"})


async def _upstream_or_local(state: ServerState, model: ModelSession, plan: GenerationPlan | None,
                             body: ChatRequest | CompletionRequest, route: str, forwarded: dict[str, Any],
                             too_long: ApiError | None):
    """A request the rules send upstream; when upstream cannot answer, the local model does (if it can)."""
    try:
        return await _from_upstream(state, route, forwarded, body.stream)
    except UpstreamError as exc:
        if plan is None:
            assert too_long is not None
            raise ApiError(502, f"{exc}, and the prompt is too long for the local model: "
                                f"{too_long.body['error']['message']}", "server_error",
                           code="upstream_unavailable") from exc
    return await _answer_locally(state, model, plan, body.stream, "local-fallback")


def _new_id(plan: GenerationPlan) -> str:
    return ("chatcmpl-" if plan.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


async def _answer_locally(state: ServerState, model: ModelSession, plan: GenerationPlan, stream: bool,
                          route_name: str):
    """Generate with the local model (a live stream, or the whole answer), marked with how it was routed."""
    _admit(state)
    state.metrics.count_route(route_name)
    ident = _new_id(plan)
    if stream:
        return _streaming(state, model, plan, ident, _chunks(state, model, plan), route_name)
    try:
        chunks = await _generate_all(state, model, plan)
    finally:
        state.in_flight -= 1
    return JSONResponse(whole_response(model, plan, ident, chunks), headers={ROUTE_HEADER: route_name})


def _streaming(state: ServerState, model: ModelSession, plan: GenerationPlan, ident: str,
               chunks: AsyncIterator[GenerationChunk], route_name: str) -> StreamingResponse:
    return StreamingResponse(_stream_events(state, model, plan, ident, chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", ROUTE_HEADER: route_name})


async def _generate_all(state: ServerState, model: ModelSession, plan: GenerationPlan) -> list[GenerationChunk]:
    chunks: list[GenerationChunk] = []
    async for chunk in _chunks(state, model, plan):
        chunks.append(chunk)
    return chunks


async def _chunks(state: ServerState, model: ModelSession, plan: GenerationPlan) -> AsyncIterator[GenerationChunk]:
    """Run the generation on a worker thread, holding the engine; yield its chunks. Leaving early (a client
    that went away) cancels the generation at the next token."""
    async with state.engine:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down)
                cancel.set()

        def produce() -> None:
            try:
                for chunk in model.stream_ids(plan.prompt_ids, plan.options, cancel):
                    put(chunk)
            except Exception as exc:
                put(exc)
            finally:
                put(done)

        started = time.perf_counter()
        worker = loop.run_in_executor(None, produce)
        first_at, made = None, 0
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, Exception):
                    raise item
                if item.token_id is not None and first_at is None:
                    first_at = time.perf_counter()
                    state.metrics.observe_ttft(first_at - started)
                made += item.token_id is not None and item.finish_reason is None
                yield item
        finally:
            cancel.set()
            await asyncio.shield(worker)  # the engine is free only once the thread has stopped
            state.metrics.count_tokens(len(plan.prompt_ids), made,
                                       time.perf_counter() - first_at if first_at else None)


async def _stream_events(state: ServerState, model: ModelSession, plan: GenerationPlan, ident: str,
                         chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[bytes]:
    events = StreamEvents(model, plan, ident)
    made = 0
    try:
        if plan.kind == "chat":
            yield events.role()
        finish = "length"
        async for chunk in chunks:
            made += visible(model, chunk)
            piece = events.piece(chunk)
            if piece is not None:
                yield piece
            finish = chunk.finish_reason or finish
        yield events.finish(finish)
        if plan.include_usage:
            yield events.usage(made)
        yield events.done()
    except Exception as exc:  # the headers (200) are sent: the stream ends with an error event instead
        yield sse(error_body(f"generation failed midway: {exc}", "server_error", code="generation_failed"))
        yield events.done()
    finally:
        state.in_flight -= 1


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
               context: int | None = None, device: Device | None = None) -> None:
    """`edgepack serve`: `defaults` come from `defaults_for`, which refused a bundle that fails verification before
    anything listens; start listening, and load the model in the background."""
    app = create_app(config, loader=lambda: open_session(defaults, threads=threads, context=context, device=device))
    _uvicorn_server(app, config).run()
