"""What every request passes before an endpoint sees it, as plain ASGI (streamed answers and disconnects pass
through untouched): an id for the request, the Host check (DNS rebinding), the Origin check (other web pages), the
API key, JSON bodies only, the request counter, and the body's size and read deadline."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers

from edgepack.serve.config import ServerConfig
from edgepack.serve.http_errors import REQUEST_ID_HEADER, REQUEST_ID_KEY, error_response, failure_message, log
from edgepack.serve.metrics import Metrics

CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer
KEYED_PREFIXES = ("/v1/", "/api/", "/metrics")  # what the API key guards (/health and the chat page stay open)
SAFE_METHODS = ("GET", "HEAD")
JSON_TYPES = ("application/json",)
CORS_MAX_AGE_S = "600"


class RequestGate:
    """Refuse a Host that is not this server's, a request from a web page that may not send one, a missing API key
    and a POST body that is not JSON; count every request by route and status (one label for every path the server
    does not serve); log a failure of the server's own with the request's id."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics,
                 served_paths: Callable[[], frozenset[str]]) -> None:
        self.app, self.config, self.metrics, self.served_paths = app, config, metrics, served_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"]  # never a URL rebuilt from the Host header a client sends
        label = route if route in self.served_paths() else "other"
        ident = "req_" + uuid.uuid4().hex[:20]
        scope[REQUEST_ID_KEY] = ident
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, message, code = refusal
            self.metrics.count_request(label, status)
            await error_response(route, status, message, code, headers={REQUEST_ID_HEADER: ident})(scope, receive,
                                                                                                  send)
            return
        cross_origin = self._cross_origin(headers)
        if scope["method"] == "OPTIONS" and cross_origin is not None:  # a browser's preflight
            self.metrics.count_request(label, 204)
            await send({"type": "http.response.start", "status": 204, "headers": _cors_headers(cross_origin, True)})
            await send({"type": "http.response.body", "body": b""})
            return
        status, started = CLIENT_CLOSED, False

        async def marked_send(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                extra = [(REQUEST_ID_HEADER.encode(), ident.encode())]
                extra += _cors_headers(cross_origin, False) if cross_origin is not None else []
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, marked_send)
        except Exception:
            status = 500
            log.exception("request %s (%s %s) failed", ident, scope["method"], route)
            if not started:  # an answer even where no handler made one
                await error_response(route, 500, failure_message(ident), "internal_error",
                                     headers={REQUEST_ID_HEADER: ident})(scope, receive, send)
        finally:
            self.metrics.count_request(label, status)

    def _refusal(self, scope, headers: Headers) -> tuple[int, str, str] | None:
        """(status, message, code) for a request refused before anything reads it."""
        route, method = scope["path"], scope["method"]
        host = headers.get("host", "")
        if not self.config.host_allowed(host):
            return (403, f"Host {host[:200]!r} is not this server's address; start the server with --allowed-host "
                    "NAME to answer requests for that name", "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and method not in SAFE_METHODS and not self.config.origin_allowed(origin, host):
            return (403, f"requests from the web page at {origin[:200]!r} are not accepted; start the server with "
                    "--allowed-origin ORIGIN to accept them", "origin_not_allowed")
        if method == "OPTIONS" and origin is not None:
            return None  # an allowed origin's preflight: answered without a key (browsers send none with it)
        if self.config.api_key is not None and route.startswith(KEYED_PREFIXES):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode()):
                return 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key"
        if method == "POST" and _media_type(headers.get("content-type", "")) not in JSON_TYPES:
            return (415, "request bodies must be JSON: send 'Content-Type: application/json'",
                    "unsupported_media_type")
        return None

    def _cross_origin(self, headers: Headers) -> str | None:
        """The Origin of an allowed page on another origin than this server's (it needs CORS headers)."""
        origin = headers.get("origin")
        if origin is None or not self.config.allowed_origins:
            return None
        if not self.config.origin_allowed(origin, headers.get("host", "")):
            return None
        return origin


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _cors_headers(origin: str, preflight: bool) -> list[tuple[bytes, bytes]]:
    headers = [(b"access-control-allow-origin", origin.encode("latin-1", "replace")), (b"vary", b"Origin")]
    if preflight:
        headers += [(b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                    (b"access-control-allow-headers", b"Authorization, Content-Type"),
                    (b"access-control-max-age", CORS_MAX_AGE_S.encode())]
    return headers


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413 (by its Content-Length, or for a chunked body as soon as the
    bytes read pass the limit), and one not all sent within `deadline_s` with 408; a body within both is handed on
    as it came."""

    def __init__(self, app, max_bytes: int, deadline_s: float) -> None:
        self.app, self.max_bytes, self.deadline_s = app, max_bytes, deadline_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + self.deadline_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await error_response(scope["path"], 408, f"the request body was not all sent within "
                                     f"{self.deadline_s:g} s", "request_timeout",
                                     headers={"Connection": "close"})(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        del chunks  # not held (a second copy of the body) while the request is answered
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        await error_response(scope["path"], 413, f"the request body is larger than this server accepts "
                             f"({self.max_bytes} bytes; see --max-body-mb)", "request_too_large")(scope, receive,
                                                                                                   send)
