"""The teacher behind an OpenAI-compatible endpoint, asked over HTTP.

Its URL must be https:// (plain http:// only to this machine, or with --allow-insecure-teacher, as `edgepack serve`
treats its upstream), and is shown, recorded and written without credentials (`display_url`). Each answer is read
up to MAX_RESPONSE_BYTES and checked field by field: a teacher that answers anything but the API's shape
is a clear error naming what was wrong, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from edgepack.core.errors import EdgepackError
from edgepack.core.net import display_url, is_loopback_host

DEFAULT_KEY_ENV = "EDGEPACK_TEACHER_API_KEY"
INSECURE_FLAG = "--allow-insecure-teacher"
LOOPBACK_HOSTS = "localhost, 127.0.0.0/8 and ::1"
# an answer of a few hundred tokens with 20 alternatives each is well under 1 MiB; this bounds a broken teacher
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
TIMEOUT_S = 300.0
RETRIED_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})  # asked once more, as openai's client did
RETRY_PAUSE_S = 1.0

TokenLogprobs = list[tuple[str, list[tuple[str, float]]]]


def check_teacher_url(url: str, allow_insecure: bool) -> None:
    """An http(s) URL; plain http:// only to this machine unless `allow_insecure` (the key and prompts would
    cross the network in clear)."""
    shown = display_url(url)
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises on a port that is not one
    except ValueError:
        parts, host = None, None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise EdgepackError(f"--teacher-url {shown} is not an http(s) URL such as https://api.example.com/v1")
    if parts.scheme == "http" and not is_loopback_host(host) and not allow_insecure:
        raise EdgepackError(f"--teacher-url {shown}: plain http:// would send the prompts and the API key "
                            f"unencrypted to another machine; use https:// (plain http:// is accepted for "
                            f"{LOOPBACK_HOSTS}), or pass {INSECURE_FLAG} for a network you trust")


class MalformedAnswer(ValueError):
    """The teacher's answer is not what the API describes (the message says what is wrong)."""


class TeacherStatusError(EdgepackError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    url: str  # the API base, e.g. https://api.example.com/v1 (may hold credentials: show display_url(url))
    model: str
    key_env: str = DEFAULT_KEY_ENV

    @property
    def shown_url(self) -> str:
        return display_url(self.url)

    def client(self) -> httpx.Client:
        key = os.environ.get(self.key_env)
        return httpx.Client(headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=TIMEOUT_S)

    def check_reachable(self) -> None:
        """Before any training: the endpoint answers and serves `model` (a clear error otherwise)."""
        with self.client() as client:
            body = self.request(client, "GET", "models")
        try:
            served = served_models(body)
        except MalformedAnswer as exc:
            raise self._malformed("GET /models", exc) from None
        if served and self.model not in served:
            raise EdgepackError(f"the teacher endpoint {self.shown_url} does not serve {self.model!r}; it serves: "
                                f"{', '.join(served)}")

    def chat(self, client: httpx.Client, payload: dict[str, Any]) -> tuple[str, TokenLogprobs | None]:
        """The first choice's text and its tokens' log-probabilities (None when the endpoint gave none)."""
        body = self.request(client, "POST", "chat/completions", payload)
        try:
            return chat_answer(body)
        except MalformedAnswer as exc:
            raise self._malformed("POST /chat/completions", exc) from None

    def request(self, client: httpx.Client, method: str, route: str, payload: dict | None = None) -> Any:
        """The JSON body of `method route`, read up to MAX_RESPONSE_BYTES; asked twice when the first try fails
        in a way a second may not."""
        for attempt in (1, 2):
            try:
                status, raw = self._send(client, method, route, payload)
            except httpx.TransportError as exc:  # refused, reset, timed out
                if attempt == 1:
                    time.sleep(RETRY_PAUSE_S)
                    continue
                raise EdgepackError(f"the teacher endpoint {self.shown_url} cannot be reached "
                                    f"({self._scrub(f'{type(exc).__name__}: {exc}')}); start it (e.g. `edgepack "
                                    "serve BUNDLE`) or check --teacher-url") from None
            except httpx.HTTPError as exc:  # e.g. a body that does not decode as its Content-Encoding says
                raise EdgepackError(f"the teacher endpoint {self.shown_url} failed on {method} /{route}: "
                                    f"{self._scrub(f'{type(exc).__name__}: {exc}')}") from None
            if status in RETRIED_STATUSES and attempt == 1:
                time.sleep(RETRY_PAUSE_S)
                continue
            break
        what = f"{method} /{route}"
        if status >= 400:
            raise TeacherStatusError(f"the teacher endpoint {self.shown_url} answered {status} to {what}: "
                                     f"{_excerpt(raw)}", status)
        try:
            return json.loads(raw)
        except ValueError:  # not JSON, or not UTF-8
            raise self._malformed(what, MalformedAnswer(f"the body is not JSON ({_excerpt(raw)})")) from None

    def _send(self, client: httpx.Client, method: str, route: str, payload: dict | None) -> tuple[int, bytes]:
        with client.stream(method, self._route_url(route), json=payload) as response:
            raw = bytearray()
            for chunk in response.iter_bytes():
                raw += chunk
                if len(raw) > MAX_RESPONSE_BYTES:
                    raise EdgepackError(f"the teacher endpoint {self.shown_url} sent more than "
                                        f"{MAX_RESPONSE_BYTES // 2**20} MiB in answer to {method} /{route}; "
                                        "no answer of the API is that large")
            return response.status_code, bytes(raw)

    def _route_url(self, route: str) -> str:
        """The API base's path + /route, its query (which may carry a key) kept."""
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, f"{parts.path.rstrip('/')}/{route}", parts.query, ""))

    def _scrub(self, text: str) -> str:
        """`text` (an HTTP library's message) without the URL's credentials, should it quote them."""
        parts = urlsplit(self.url)
        secrets = [parts.netloc.rpartition("@")[0], parts.query, parts.fragment]
        for secret in sorted(filter(None, secrets), key=len, reverse=True):
            text = text.replace(secret, "...")
        return text

    def _malformed(self, what: str, problem: MalformedAnswer) -> EdgepackError:
        return EdgepackError(f"the teacher endpoint {self.shown_url} gave a malformed answer to {what}: {problem}")


def served_models(body: Any) -> list[str]:
    data = _field(body, "data", list, "")
    return [_field(item, "id", str, f"data[{i}]") for i, item in enumerate(data)]


def chat_answer(body: Any) -> tuple[str, TokenLogprobs | None]:
    choices = _field(body, "choices", list, "")
    if not choices:
        raise MalformedAnswer("choices is an empty list (no answer)")
    message = _field(choices[0], "message", dict, "choices[0]")
    text = _field(message, "content", str, "choices[0].message", optional=True) or ""
    logprobs = _field(choices[0], "logprobs", dict, "choices[0]", optional=True)
    content = _field(logprobs, "content", list, "choices[0].logprobs", optional=True) if logprobs else None
    return text, _token_logprobs(content) if content else None


def _token_logprobs(content: list) -> TokenLogprobs:
    """Per answer token, (token, [(alternative, logprob), ...]) most likely first, the chosen token among them."""
    tokens = []
    for i, entry in enumerate(content):
        where = f"choices[0].logprobs.content[{i}]"
        token, logprob = _field(entry, "token", str, where), _logprob(entry, where)
        top = _field(entry, "top_logprobs", list, where, optional=True) or []
        alternatives = [(_field(a, "token", str, f"{where}.top_logprobs[{j}]"),
                         _logprob(a, f"{where}.top_logprobs[{j}]")) for j, a in enumerate(top)]
        if token not in {text for text, _ in alternatives}:
            alternatives.insert(0, (token, logprob))
        alternatives.sort(key=lambda pair: -pair[1])
        tokens.append((token, alternatives))
    return tokens


def _logprob(entry: dict, where: str) -> float:
    value = _field(entry, "logprob", (int, float), where)
    if isinstance(value, bool) or math.isnan(value):
        raise MalformedAnswer(f"{where}.logprob is {value!r}, not a number")
    return float(value)


def _field(container: Any, key: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    """container[key], checked to be a `kind` (or None/absent when `optional`); `where` is the container's path
    in the answer ("" for the answer itself)."""
    if not isinstance(container, dict):
        raise MalformedAnswer(f"{where or 'the answer'} is {_describe(container)}, not a JSON object")
    value = container.get(key)
    if value is None and optional:
        return None
    if key not in container:
        raise MalformedAnswer(f"{where or 'the answer'} has no {key!r}")
    if not isinstance(value, kind):
        path = f"{where}.{key}" if where else key
        raise MalformedAnswer(f"{path} is {_describe(value)}, not {_describe_kind(kind)}")
    return value


def _describe(value: Any) -> str:
    names = {dict: "a JSON object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _describe_kind(kind: type | tuple[type, ...]) -> str:
    return "a number" if isinstance(kind, tuple) else _describe(kind())


def _excerpt(raw: bytes, limit: int = 200) -> str:
    text = raw[:limit].decode("utf-8", errors="replace").strip()
    return repr(text + ("..." if len(raw) > limit else "")) if text else "an empty body"
