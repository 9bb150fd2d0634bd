"""The local server (FastAPI + uvicorn) over any variant or verified bundle: OpenAI's API (edgepack.serve.openai_api),
Ollama's (edgepack.serve.ollama) and the chat page at / (edgepack.serve.chat_page), on one app.

How a request goes through it:
- edgepack.serve.listener: uvicorn, with a bound on connections and a deadline for a request's headers;
- edgepack.serve.middleware: an id, the Host, Origin and API key checks, JSON bodies only, the body's size and read
  deadline, the request counter;
- the API's routes parse the body (edgepack.serve.protocol, edgepack.serve.ollama_protocol) and hand it to request
  planning (edgepack.serve.planning: a place in the queue, limits, the grammar compiled, the prompt tokenized);
- edgepack.serve.engine_stream runs the generation and streams it; each API shapes the answer.
Errors are answered in the shape of the API a path belongs to (edgepack.serve.http_errors).

As many generations run at once as the engine takes (llama.cpp batches `--parallel` of them; other engines run
one); further requests wait in a bounded queue, first come first served, and past its bound the answer is 503
with Retry-After. A client that goes away (while its prompt is prepared, before its stream starts, mid-stream, or
while waiting for a whole answer) frees its place and stops its work at the next step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from edgepack.serve.chat_page import add_chat_page
from edgepack.serve.config import ServerConfig, read_api_key
from edgepack.serve.engine_stream import ClientGone
from edgepack.serve.http_errors import add_error_handlers
from edgepack.serve.listener import RunningServer, start_in_thread, uvicorn_server
from edgepack.serve.middleware import CLIENT_CLOSED, BodyLimit, RequestGate
from edgepack.serve.ollama import add_ollama_routes
from edgepack.serve.openai_api import add_openai_routes
from edgepack.serve.session import ModelSession, ServeDefaults, open_session
from edgepack.serve.state import ServerState
from runtimes.base import Device

__all__ = ["RunningServer", "ServerConfig", "create_app", "read_api_key", "run_server", "serve_path",
           "start_server_thread"]
log = logging.getLogger("edgepack.serve")


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

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, deadline_s=config.body_deadline_s)
    app.add_middleware(RequestGate, config=config, metrics=state.metrics,
                       served_paths=served_paths)  # outermost: refused requests are never read
    add_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the request counter does

    _add_health_and_metrics(app, state)
    add_openai_routes(app, state)
    add_ollama_routes(app, state)
    add_chat_page(app)
    return app


def _add_health_and_metrics(app: FastAPI, state: ServerState) -> None:
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


def start_server_thread(model: ModelSession, config: ServerConfig) -> RunningServer:
    """Serve `model` from a thread of this process (port 0: any free port); returns once it accepts requests."""
    return start_in_thread(create_app(config, model=model), config)


def run_server(model: ModelSession, config: ServerConfig) -> None:
    uvicorn_server(create_app(config, model=model), config).run()


def serve_path(defaults: ServeDefaults, config: ServerConfig, threads: int | None = None,
               context: int | None = None, device: Device | None = None, parallel: int | None = None,
               chat_template: str | None = None) -> None:
    """`edgepack serve`: `defaults` come from `defaults_for`, which refused a bundle that fails verification before
    anything listens; start listening, and load the model in the background."""
    if config.exposed_without_key:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the model; "
                    "give --api-key-file", config.host)
    app = create_app(config, loader=lambda: open_session(defaults, threads=threads, context=context, device=device,
                                                         parallel=parallel, chat_template=chat_template))
    uvicorn_server(app, config).run()
