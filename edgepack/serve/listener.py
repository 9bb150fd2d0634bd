"""The server on its socket: uvicorn with a bound on connections and a deadline for a request's headers, in this
thread (`edgepack serve`) or in a thread of its own (tests, `edgepack.load(...).serve()`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import h11
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgepack.core.errors import EdgepackError
from edgepack.serve.config import ServerConfig
from edgepack.serve.heap import bound_the_heap

KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this long (uvicorn's default)


def header_deadline_protocol(deadline_s: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request line and headers have not all arrived
    `deadline_s` after its first byte (or after the connection opened): uvicorn itself waits for ever, so a client
    sending a header line every few seconds would hold its connection as long as it likes."""

    class HeaderDeadline(H11Protocol):
        _deadline: Any = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._arm()  # a request's headers are still coming
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(deadline_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def uvicorn_server(app: FastAPI, config: ServerConfig):
    import uvicorn

    bound_the_heap()
    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                         access_log=False, lifespan="on", http=header_deadline_protocol(
                                             config.header_deadline_s), limit_concurrency=config.max_connections,
                                         timeout_keep_alive=KEEP_ALIVE_S))


@dataclass
class RunningServer:
    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_in_thread(app: FastAPI, config: ServerConfig) -> RunningServer:
    """Serve `app` from a thread of this process (port 0: any free port); returns once it accepts requests."""
    server = uvicorn_server(app, config)
    thread = threading.Thread(target=server.run, name="edgepack-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise EdgepackError(f"the server did not start on {config.host}:{config.port}")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    host = f"[{config.host}]" if ":" in config.host else config.host
    return RunningServer(url=f"http://{host}:{port}", server=server, thread=thread)
