"""What every request passes before an endpoint sees it, as plain ASGI (streamed answers and disconnects pass
through untouched): the Host check, the API key on /v1/ and Ollama's /api/, the request counter, and the body size
limit."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from edgepack.core.errors import error_body
from edgepack.serve.metrics import Metrics

CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer


class RequestGate:
    """Refuse a Host that is not this server's (DNS rebinding) and a missing API key; count every request by
    route and status, with one label for every path the server does not serve."""

    def __init__(self, app, host_allowed: Callable[[str], bool], api_key: str | None, metrics: Metrics,
                 served_paths: Callable[[], frozenset[str]]) -> None:
        self.app, self.host_allowed, self.api_key = app, host_allowed, api_key
        self.metrics, self.served_paths = metrics, served_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"]  # never a URL rebuilt from the Host header a client sends
        label = route if route in self.served_paths() else "other"
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.host_allowed(host):
            await self._refuse(send, route, label, 403, f"Host {host!r} is not this server's address; start the "
                               "server with --allowed-host NAME to answer requests for that name", "host_not_allowed")
            return
        if self.api_key is not None and route.startswith(("/v1/", "/api/")):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                await self._refuse(send, route, label, 401, "Incorrect or missing API key: send 'Authorization: "
                                   "Bearer <key>'", "invalid_api_key")
                return
        status = CLIENT_CLOSED

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.count_request(label, status)

    async def _refuse(self, send, route: str, label: str, status: int, message: str, code: str) -> None:
        self.metrics.count_request(label, status)
        body = {"error": message} if route.startswith("/api/") else error_body(message, code=code)  # Ollama's shape
        await JSONResponse(body, status_code=status)({"type": "http"}, None, send)


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
