"""The server's settings, and the rules on who may talk to it: which Host names it answers (DNS rebinding), which
web pages may send it requests (Origin), and the bounds on connections and slow clients."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from edgepack.core.errors import EdgepackError
from edgepack.core.net import is_loopback_host
from edgepack.serve.router import RouterConfig

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
# A connection must have sent its request line and headers within this many seconds, and its body within
# BODY_DEADLINE_S of them: a client that trickles a byte every few seconds cannot hold a connection for ever
HEADER_DEADLINE_S = 10.0
BODY_DEADLINE_S = 30.0
# Open connections at once; past it new requests get 503 (uvicorn's limit_concurrency). A 2-core device serves a
# few clients; this leaves room for the queue (16 by default) and for /health and /metrics pollers
MAX_CONNECTIONS = 64


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
    # Host headers answered besides this machine's loopback names and IP addresses written as such, on every bind
    allowed_hosts: tuple[str, ...] = ()
    # web origins (scheme://host[:port]) whose pages may send requests, besides the server's own page; "*": any
    allowed_origins: tuple[str, ...] = ()
    max_connections: int = MAX_CONNECTIONS
    header_deadline_s: float = HEADER_DEADLINE_S
    body_deadline_s: float = BODY_DEADLINE_S

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise EdgepackError(f"--max-queue {self.max_queue}: must be 0 or more")
        if self.max_upstream < 1:
            raise EdgepackError(f"--max-upstream {self.max_upstream}: must be 1 or more")
        if self.max_body_bytes < 1024:
            raise EdgepackError(f"the request body limit ({self.max_body_bytes} bytes) must be at least 1 KiB")
        if self.max_connections < 2:
            raise EdgepackError(f"the connection limit ({self.max_connections}) must be at least 2")
        for origin in self.allowed_origins:
            if origin != "*" and normal_origin(origin) is None:
                raise EdgepackError(f"--allowed-origin {origin!r} is not an origin such as https://app.example "
                                    "or http://localhost:3000 (scheme, host and port only), or *")

    def host_allowed(self, host_header: str) -> bool:
        """A web page can reach this server under a DNS name it controls (DNS rebinding); it cannot make the
        browser send a loopback name or an IP address that is not its own. So those are answered on every bind, and
        other names only when they were given (--allowed-host)."""
        name = _host_name(host_header)
        if is_loopback_host(name) or _is_ip_address(name):
            return True
        return name in (host.lower() for host in self.allowed_hosts)

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        """A browser names the page that sent a request in Origin: the server's own page (its chat page) and the
        origins given with --allowed-origin may send requests; any other page may not."""
        if "*" in self.allowed_origins:
            return True
        given = normal_origin(origin)
        if given is None:
            return False  # "null" (a sandboxed frame, a file:// page) or something that is not an origin
        if urlsplit(given).netloc == host_header.lower():
            return True
        return given in self._normal_allowed_origins

    @functools.cached_property
    def _normal_allowed_origins(self) -> frozenset[str | None]:
        return frozenset(normal_origin(origin) for origin in self.allowed_origins)

    @property
    def exposed_without_key(self) -> bool:
        """Listening beyond this machine with nothing to keep others out."""
        return self.api_key is None and not is_loopback_host(self.host)


def normal_origin(origin: str) -> str | None:
    """scheme://host[:port] in lower case, None for anything else (a path, credentials, "null")."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https", "app", "tauri") or not parts.hostname or parts.username \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def _host_name(host_header: str) -> str:
    header = host_header.strip().lower()
    if header.startswith("["):  # [::1]:8080
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


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
