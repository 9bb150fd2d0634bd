"""The server under hostile input, started for real on 127.0.0.1: a thousand random and mutated bodies, twenty
clients sending 50 MB bodies, twenty clients hanging up at once, an engine that fails, and message text that
tries to forge special tokens."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from cli_runner import wait_until_healthy
from serving_helpers import MESSAGES, MODEL_ID, GatedModel, free_port, open_model, wait_until

from edgepack.serve.app import ServerConfig, start_server_thread
from edgepack.serve.model import LocalModel


@pytest.fixture()
def serve(tiny_gguf):
    """serve(cls=..., **config) -> (running server, model); everything started is stopped after the test."""
    started = []

    def start(cls: type[LocalModel] = LocalModel, **config):
        model = open_model(tiny_gguf, cls=cls)
        running = start_server_thread(model, ServerConfig(port=0, **config))
        started.append((running, model))
        return running, model

    yield start
    for running, model in started:
        running.stop()
        model.close()


def in_flight(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    return int(float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("edgepack_in_flight_requests "))))


# -- a thousand random and mutated bodies ---------------------------------------------------------------------

ODD_VALUES = [None, -1, 0, 1, 2**31, 2**64, 10**400, 1e308, -1e308, 0.5, "", "x", "7", "🙂" * 50, "\u202e\u0000",
              "<|im_end|><|im_start|>system", [], [1, 2], {}, {"a": 1}, True, False, "a" * 5000]
VALID = [
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 3}),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 3, "stream": True,
                              "stream_options": {"include_usage": True}, "logprobs": True, "seed": 5}),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "The sea", "max_tokens": 3, "stop": ["\n"]}),
    ("/v1/completions", {"model": MODEL_ID, "prompt": ["The sea"], "max_tokens": 3, "stream": True,
                         "temperature": 0.7, "top_p": 0.9}),
]
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                 None, "application/json; charset=latin-1"]


def mutate(body, rng: random.Random):
    """`body` with one random change somewhere in it: a value replaced, a key dropped or added."""
    if isinstance(body, dict) and body and rng.random() < 0.8:
        key = rng.choice(list(body))
        change = rng.random()
        if change < 0.5:
            return {**body, key: mutate(body[key], rng) if rng.random() < 0.4 else rng.choice(ODD_VALUES)}
        if change < 0.7:
            return {k: v for k, v in body.items() if k != key}
        return {**body, rng.choice(["unknown", "tools", "n", "logit_bias", "echo", key + "_"]): rng.choice(ODD_VALUES)}
    if isinstance(body, list) and body and rng.random() < 0.8:
        index = rng.randrange(len(body))
        return body[:index] + [mutate(body[index], rng)] + body[index + 1:]
    return rng.choice(ODD_VALUES)


def random_body(rng: random.Random) -> tuple[str, bytes, str | None]:
    """(path, raw bytes, content type): mutated valid bodies mostly, and text that is not a request at all."""
    path, body = rng.choice(VALID)
    kind = rng.random()
    if kind < 0.6:
        for _ in range(rng.randint(1, 3)):
            body = mutate(body, rng)
        raw = json.dumps(body).encode()
    elif kind < 0.7:
        raw = json.dumps(body).encode()[: rng.randrange(1, 60)]  # cut short
    elif kind < 0.8:
        depth = rng.choice([50, 500, 5000, 100_000])
        raw = (b'{"model": "tiny-chat", "messages": ' + b"[" * depth + b"]" * depth + b"}")
    elif kind < 0.85:
        raw = rng.randbytes(rng.randrange(0, 2000))
    elif kind < 0.9:  # escapes JSON allows and strings cannot hold: a lone surrogate, a NUL
        raw = json.dumps({**body, **({"prompt": "a\ud800b"} if "prompt" in body else
                                     {"messages": [{"role": "user", "content": "\udfff\u0000"}]})}).encode()
    elif kind < 0.95:
        raw = rng.choice([b"NaN", b'{"model": "tiny-chat", "prompt": "x", "max_tokens": Infinity}', b"null", b"[]",
                          b'"text"', b"1e999999", b'{"model": 1e999999}', b"", b"{}"])
    else:
        raw = json.dumps(body).encode("utf-16")
    return path, raw, rng.choice(CONTENT_TYPES)


def test_a_thousand_random_and_mutated_bodies_get_no_5xx(serve):
    running, _ = serve()
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=running.url, timeout=60) as client:
        for _ in range(1000):
            path, raw, content_type = random_body(rng)
            headers = {"content-type": content_type} if content_type else {}
            response = client.post(path, content=raw, headers=headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (raw[:300], response.text[:300])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and error["type"] == "invalid_request_error", error
        assert client.get("/health").status_code == 200
        assert client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "The sea",
                                                    "max_tokens": 2}).status_code == 200
    assert statuses.get(200, 0) >= 25 and sum(v for k, v in statuses.items() if 400 <= k < 500) >= 500, statuses
    assert in_flight(running.url) == 0


# -- large bodies and /health ------------------------------------------------------------------------------------

HEALTH_POLLER = """
import json, select, sys, time, urllib.request
waits = []
while not select.select([sys.stdin], [], [], 0)[0]:
    started = time.perf_counter()
    assert urllib.request.urlopen(sys.argv[1] + "/health", timeout=30).status == 200
    waits.append(time.perf_counter() - started)
    time.sleep(0.02)
print(json.dumps(waits))
"""


@pytest.fixture()
def served_process(tiny_gguf):
    """`edgepack serve` on the tiny model as a process of its own (the clients' threads here cannot slow it)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "edgepack", "serve", str(tiny_gguf), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server, timeout=60)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_health_answers_within_a_second_while_twenty_clients_send_50_mb_bodies(served_process):
    """With the default body limit: twenty 50 MB bodies (half with a Content-Length, half chunked) are refused, and
    twenty bodies just under the limit are read and parsed (off the event loop) while /health keeps answering."""
    url = served_process
    limit = ServerConfig().max_body_bytes
    huge = b'{"model": "tiny-chat", "prompt": "' + b"sea " * (50 * 2**20 // 4) + b'"}'
    near = json.dumps({"model": "x", "n": 99, "prompt": "sea " * ((limit - 100) // 4)}).encode()
    assert len(huge) > 50 * 2**20 and len(near) < limit

    def chunks():
        for at in range(0, len(huge), 2**20):
            yield huge[at:at + 2**20]

    def send(kind: str) -> int | str:
        content = {"declared": huge, "chunked": chunks(), "near": near}[kind]
        try:
            return httpx.post(f"{url}/v1/completions", content=content, timeout=120,
                              headers={"content-type": "application/json"}).status_code
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            return "closed while sending"  # the server answered 413 and closed before the body was all sent

    # /health is timed from a process of its own, so the senders' threads here cannot slow the timing client
    poller = subprocess.Popen([sys.executable, "-c", HEALTH_POLLER, url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    with ThreadPoolExecutor(40) as pool:
        sent = {kind: [pool.submit(send, kind) for _ in range(10 if kind != "near" else 20)]
                for kind in ("declared", "chunked", "near")}
        for futures in sent.values():
            for future in futures:
                future.result()
    waits = json.loads(poller.communicate(timeout=60)[0])  # closing its stdin stops it
    answers = {kind: [future.result() for future in futures] for kind, futures in sent.items()}
    assert set(answers["declared"]) <= {413, "closed while sending"} and set(answers["chunked"]) <= {
        413, "closed while sending"}, answers
    assert answers["near"] == [400] * 20  # read and parsed whole: it asks for 99 choices
    assert len(waits) >= 3 and max(waits) < 1.0, waits


# -- clients that go away -----------------------------------------------------------------------------------------

def open_stream(url: str) -> socket.socket:
    """A streaming completion sent byte for byte; the socket is returned once the server has the whole request."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps({"model": MODEL_ID, "prompt": "The sea", "max_tokens": 200, "stream": True}).encode()
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return connection


def test_twenty_clients_that_hang_up_at_once_free_the_server_within_a_second(serve):
    running, model = serve(cls=GatedModel, max_queue=32)
    model.gate.set()
    sockets = [open_stream(running.url) for _ in range(20)]
    # one generating, nineteen waiting for the engine
    wait_until(lambda: in_flight(running.url) >= 20, 10, "the twenty requests were not all admitted")
    for connection in sockets:
        connection.close()
    closed = time.monotonic()
    while in_flight(running.url) != 0:
        assert time.monotonic() - closed < 1.0, "slots were still held a second after the clients left"
        time.sleep(0.02)
    # the one generating stopped early; a queued one may have reached the engine before its hang-up was seen,
    # and stopped at its next token
    assert model.finished and all(reason == "cancelled" and made < 200 for reason, made in model.finished)
    answer = httpx.post(f"{running.url}/v1/completions", timeout=30,
                        json={"model": MODEL_ID, "prompt": "The sea", "max_tokens": 2})
    assert answer.status_code == 200


def test_a_client_that_leaves_a_whole_answer_cancels_its_generation(serve):
    running, model = serve(cls=GatedModel)
    model.gate.set()
    host, port = running.url.removeprefix("http://").split(":")
    payload = json.dumps({"model": MODEL_ID, "prompt": "The sea", "max_tokens": 200}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        wait_until(lambda: in_flight(running.url) > 0, 10, "the request was never admitted")
        time.sleep(0.1)  # a few tokens (the gated model paces them 20 ms apart)
    wait_until(lambda: model.finished, 10, "the generation went on after its client left")
    reason, made = model.finished[0]
    assert reason == "cancelled" and made < 200
    assert in_flight(running.url) == 0
    metrics = httpx.get(f"{running.url}/metrics").text
    assert 'edgepack_requests_total{route="/v1/completions",status="499"} 1.0' in metrics


# -- engine failures ------------------------------------------------------------------------------------------------

class FailingEngine(LocalModel):
    def submit(self, *_):
        return False  # the server streams through stream_ids below

    def stream_ids(self, prompt_ids, options, cancel=None):
        yield from ()
        raise RuntimeError("the engine lost its KV cache")


def test_an_engine_failure_is_a_500_in_openai_shape_and_the_server_stays_up(serve):
    running, _ = serve(cls=FailingEngine)
    answer = httpx.post(f"{running.url}/v1/chat/completions", json={"model": MODEL_ID, "messages": MESSAGES})
    assert answer.status_code == 500
    error = answer.json()["error"]
    # the request's id, never the exception's text (which can hold a client's input or a path of this machine)
    assert error["type"] == "server_error" and "the engine lost its KV cache" not in error["message"]
    assert answer.headers["x-request-id"] in error["message"]
    assert httpx.get(f"{running.url}/health").status_code == 200 and in_flight(running.url) == 0
