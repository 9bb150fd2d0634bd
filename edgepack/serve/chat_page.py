"""A chat page at `/`, served by the server itself: one HTML file with its script and styles inline (no CDN, no build
step, works offline), for an operator in the field to try the model without writing a client. It streams from
/v1/chat/completions, shows the route each answer took and /health's figures, and asks for the API key when the
server has one (the page itself holds nothing secret; the key stays in the browser's session storage)."""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

# The page may run its own inline script and styles and talk to this server only
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")


@functools.cache
def chat_page() -> str:
    return resources.files("edgepack.serve").joinpath("chat_page.html").read_text(encoding="utf-8")


def add_chat_page(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(chat_page(), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                  "X-Content-Type-Options": "nosniff",
                                                  "Cache-Control": "no-cache"})
