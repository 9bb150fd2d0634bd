"""Error answers in the shape of the API a path belongs to: Ollama's `{"error": "..."}` under /api/, OpenAI's
`{"error": {"message", "type", "param", "code"}}` everywhere else; and the handlers that make every error the
server meets one of those (a 404, a 405, a body that does not parse, a failure of our own).

A failure of the server's own is logged with the request's id by the request gate (edgepack.serve.middleware), and
the client gets the id, never the exception's text (which can hold a client's input, or a path of this machine)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from edgepack.core.errors import ApiError, error_body

REQUEST_ID_KEY = "edgepack.request_id"  # where the gate puts the request's id in the ASGI scope
REQUEST_ID_HEADER = "x-request-id"
log = logging.getLogger("edgepack.serve")


def is_ollama_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def error_payload(path: str, status: int, message: str, code: str | None = None,
                  param: str | None = None) -> dict[str, Any]:
    if is_ollama_path(path):
        return {"error": message}
    return error_body(message, "server_error" if status >= 500 else "invalid_request_error", param, code)


def error_response(path: str, status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(path, status, message, code, param), status_code=status, headers=headers)


def request_id(request: Request) -> str:
    return str(request.scope.get(REQUEST_ID_KEY, "unknown"))


def failure_message(ident: str) -> str:
    """What a client is told of a failure of the server's own: the id to find it in the log, not its text."""
    return f"the server failed to answer (request id {ident}; its log has the details)"


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if is_ollama_path(request.url.path):
            return JSONResponse({"error": exc.body["error"]["message"]}, status_code=exc.status, headers=exc.headers)
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        message = {404: f"no such route: {request.method} {path}",
                   405: f"{request.method} is not allowed on {path}"}.get(exc.status_code, str(exc.detail))
        return error_response(path, exc.status_code, message, _HTTP_CODES.get(exc.status_code),
                              headers=getattr(exc, "headers", None))

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
        return error_response(request.url.path, 400, message, param=where or None)
