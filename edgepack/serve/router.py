"""Hybrid routing: the local model answers what it can; the rest goes to an upstream OpenAI-compatible endpoint.

Policies: `local` (never upstream), `remote` (always upstream; the local model answers when upstream fails) and
`auto`: rules first (the request names the upstream model; the prompt does not fit the local context; a
configured pattern matches), then confidence: the local answer is generated, and when its mean token
log-probability or its weakest token falls below the thresholds, the request goes upstream. Upstream down, slow
past the timeout, or failing -> the local answer, marked `local-fallback`.

The upstream key is read from an environment variable when a request is sent; it is never stored in a config
file, a bundle, a log line or a response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import httpx
import regex
from pydantic import BaseModel

from edgepack.core.errors import ApiError, EdgepackError, UpstreamError, error_body
from edgepack.core.net import display_url, is_loopback_host

Policy = Literal["local", "remote", "auto"]
POLICIES: tuple[str, ...] = get_args(Policy)
DEFAULT_KEY_ENV = "EDGEPACK_UPSTREAM_API_KEY"
ROUTE_HEADER = "x-edgepack-route"
# a routing pattern gets this long on one prompt; one that backtracks past it counts as not matching (the regex
# module's matcher checks the time as it goes, so a pattern such as (a+)+$ cannot hold a worker for long)
PATTERN_TIMEOUT_S = 0.25
log = logging.getLogger("edgepack.serve")


@dataclass(frozen=True)
class RouterConfig:
    policy: Policy = "local"
    upstream_url: str | None = None  # e.g. https://api.example.com/v1
    upstream_model: str | None = None
    key_env: str = DEFAULT_KEY_ENV  # the name of the variable holding the key, never the key
    timeout_s: float = 30.0
    min_mean_logprob: float | None = None  # auto: below this mean token log-probability, ask upstream
    min_token_logprob: float | None = None  # auto: a token below this, ask upstream
    patterns: tuple[str, ...] = ()  # auto: a prompt matching any of these (regex) goes upstream
    allow_insecure_upstream: bool = False  # plain http:// to a host other than this machine
    upstream_max_tokens: int = 2048  # what one request may ask the upstream model (paid per token) to write
    upstream_max_choices: int = 1  # n sent upstream; a request asking more is refused

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise EdgepackError(f"routing policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        for pattern in self.patterns:
            try:
                regex.compile(pattern)
            except regex.error as exc:
                raise EdgepackError(f"routing pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        if self.timeout_s <= 0:
            raise EdgepackError("the upstream timeout must be positive")
        if self.upstream_max_tokens < 1 or self.upstream_max_choices < 1:
            raise EdgepackError("the upstream caps (--upstream-max-tokens, --upstream-max-choices) must be 1 or more")

    def check_ready(self) -> None:
        """A server can route with this config (a calibration file alone may not name the upstream yet)."""
        if self.policy != "local" and not (self.upstream_url and self.upstream_model):
            raise EdgepackError(f"routing policy {self.policy!r} needs --upstream URL and --upstream-model NAME")
        if self.upstream_url:
            url = urlsplit(self.upstream_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise EdgepackError(f"--upstream {display_url(self.upstream_url)!r} is not an http(s) URL such as "
                                    "https://api.example.com/v1")
            if url.scheme == "http" and not is_loopback_host(url.hostname) and not self.allow_insecure_upstream:
                raise EdgepackError(f"--upstream {display_url(self.upstream_url)}: plain http:// would send the "
                                    "prompts and the API key unencrypted to another machine; use https://, or pass "
                                    "--allow-insecure-upstream for a network you trust")

    def to_file(self, path: Path) -> None:
        data = {k: v for k, v in asdict(self).items()}
        data["patterns"] = list(self.patterns)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> RouterConfig:
        path = Path(path)
        if not path.is_file():
            raise EdgepackError(f"router config {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise EdgepackError(f"router config {path} is not valid JSON: {exc}") from exc
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise EdgepackError(f"router config {path}: unknown field {unknown[0]!r}; known: "
                                f"{', '.join(sorted(known))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        data["patterns"] = tuple(data.get("patterns", ()))
        return cls(**data)

    @classmethod
    def from_options(cls, config_file: Path | None = None, **overrides: Any) -> RouterConfig:
        """A config file (when given) with the options given on the command line over it; ready to serve."""
        given = {key: (tuple(value) if key == "patterns" else value) for key, value in overrides.items()
                 if value is not None and value != ()}
        config = cls.from_file(config_file, **given) if config_file is not None else cls(**given)
        config.check_ready()
        return config


@dataclass(frozen=True)
class Confidence:
    mean_logprob: float
    min_logprob: float
    tokens: int


def confidence_of(logprobs: list[float]) -> Confidence | None:
    if not logprobs:
        return None
    return Confidence(mean_logprob=sum(logprobs) / len(logprobs), min_logprob=min(logprobs), tokens=len(logprobs))


def rule_reason(config: RouterConfig, model_name: str | None, prompt_text: str, fits_locally: bool) -> str | None:
    """Why a request goes upstream before any local generation (None: it does not, by rule). With patterns it can
    take up to PATTERN_TIMEOUT_S per pattern: call it off the event loop."""
    if config.policy == "local":
        return None
    if config.policy == "remote":
        return "policy remote"
    if model_name == config.upstream_model:
        return f"the request names the upstream model {config.upstream_model}"
    if not fits_locally:
        return "the prompt is too long for the local context"
    for pattern in config.patterns:
        if pattern_matches(pattern, prompt_text):
            return f"the prompt matches the pattern {pattern!r}"
    return None


def pattern_matches(pattern: str, text: str) -> bool:
    try:
        return regex.search(pattern, text, timeout=PATTERN_TIMEOUT_S, concurrent=True) is not None
    except TimeoutError:
        log.warning("routing pattern %r gave up after %g s on a %d-character prompt; counted as not matching",
                    pattern, PATTERN_TIMEOUT_S, len(text))
        return False


def upstream_body(body: BaseModel, config: RouterConfig) -> dict[str, Any]:
    """The request as the upstream model gets it: only the fields the client set (OpenAI's API refuses arguments it
    does not know, and our defaults are not the client's), never `top_k` (not OpenAI's), with max_tokens capped
    at upstream_max_tokens (set to it when the client gave none); more choices than upstream_max_choices is a
    400, since each one is paid for."""
    forwarded = body.model_dump(exclude_unset=True, exclude_none=True, by_alias=True)
    forwarded.pop("top_k", None)
    choices = forwarded.get("n", 1)
    if choices > config.upstream_max_choices:
        raise ApiError(400, f"n: requests answered by the upstream model take at most {config.upstream_max_choices} "
                            "choice(s) (--upstream-max-choices)", param="n")
    limit_key = "max_completion_tokens" if "max_completion_tokens" in forwarded else "max_tokens"
    forwarded[limit_key] = min(forwarded.get(limit_key, config.upstream_max_tokens), config.upstream_max_tokens)
    return forwarded


def low_confidence(config: RouterConfig, confidence: Confidence | None) -> str | None:
    if config.policy != "auto" or confidence is None:
        return None
    if config.min_mean_logprob is not None and confidence.mean_logprob < config.min_mean_logprob:
        return f"mean token log-probability {confidence.mean_logprob:.3f} < {config.min_mean_logprob:.3f}"
    if config.min_token_logprob is not None and confidence.min_logprob < config.min_token_logprob:
        return f"weakest token log-probability {confidence.min_logprob:.3f} < {config.min_token_logprob:.3f}"
    return None


class Upstream:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(config.timeout_s))

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.config.key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _url(self, route: str) -> str:
        return self.config.upstream_url.rstrip("/") + route  # type: ignore[union-attr]

    def _body(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "model": self.config.upstream_model}

    def _timed_out(self) -> UpstreamError:
        return UpstreamError(f"upstream timed out after {self.config.timeout_s:g} s")

    async def complete(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """The whole answer; the timeout covers the whole call, not each read."""
        try:
            response = await asyncio.wait_for(
                self.client.post(self._url(route), json=self._body({**body, "stream": False}),
                                 headers=self._headers()), self.config.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
            raise self._timed_out() from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise UpstreamError(f"upstream answered {response.status_code}")
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamError("upstream answered with something that is not JSON") from exc

    async def open_stream(self, route: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Start a streaming request; raises UpstreamError before the first byte if upstream cannot answer, so
        the caller can still fall back to the local model. The relay yields the stream decoded (gzip and the other
        content-encodings httpx reads), and the timeout covers the whole stream: past it, or when upstream fails
        midway, the stream ends with an error event."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout_s
        request = self.client.build_request("POST", self._url(route), json=self._body({**body, "stream": True}),
                                            headers=self._headers())
        try:
            response = await asyncio.wait_for(self.client.send(request, stream=True), self.config.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
            raise self._timed_out() from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            await response.aclose()
            raise UpstreamError(f"upstream answered {response.status_code}")

        async def relay() -> AsyncIterator[bytes]:
            pieces = response.aiter_bytes()
            try:
                while True:
                    try:
                        yield await asyncio.wait_for(anext(pieces), max(0.0, deadline - loop.time()))
                    except StopAsyncIteration:
                        return
            except (asyncio.TimeoutError, httpx.HTTPError) as exc:
                problem = str(self._timed_out()) if isinstance(exc, asyncio.TimeoutError | httpx.TimeoutException) \
                    else f"upstream failed midway: {type(exc).__name__}"
                yield _event(error_body(problem, "server_error", code="upstream_failed")) + _event("[DONE]")
            finally:
                await response.aclose()

        return relay()

    async def close(self) -> None:
        await self.client.aclose()


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
