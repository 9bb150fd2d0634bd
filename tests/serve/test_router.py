"""Hybrid routing against a second edgepack server as the upstream "cloud" (and, for failures, a real HTTP server
that answers 500 or too slowly): escalation by confidence and by rule, offline fallback, upstream errors and
timeouts, calibration, and the upstream key staying out of responses and logs."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from serving_helpers import CONTEXT, MESSAGES, MODEL_ID, free_port, open_model

from edgepack.core.errors import EdgepackError
from edgepack.serve.app import ServerConfig, start_server_thread
from edgepack.serve.router import ROUTE_HEADER, RouterConfig

CLOUD_ID = "cloud-model"
SECRET = "sk-test-upstream-0123456789abcdef"
KEY_ENV = "EDGEPACK_TEST_UPSTREAM_KEY"


@pytest.fixture(scope="module")
def cloud(tiny_gguf):
    """The upstream: an edgepack server of its own (a longer context), which insists on the key."""
    model = open_model(tiny_gguf, model_id=CLOUD_ID, context=512)
    running = start_server_thread(model, ServerConfig(port=0, api_key=SECRET))
    yield running
    running.stop()
    model.close()


@dataclass(frozen=True)
class BrokenCloud:
    url: str
    release: threading.Event
    arrived: threading.Event
    received: list  # the bodies /strict/v1 was sent


# the arguments OpenAI's chat completions API defines (its API reference), of those this server accepts
OPENAI_CHAT_ARGUMENTS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                         "stop", "stream", "stream_options", "n", "user", "presence_penalty", "frequency_penalty",
                         "logit_bias", "response_format", "logprobs", "top_logprobs", "tools", "tool_choice",
                         "parallel_tool_calls"}

CLOUD_STREAM = ('data: {"id":"c1","object":"chat.completion.chunk","created":0,"model":"cloud-model","choices":'
                '[{"index":0,"delta":{"content":"Hi from the cloud"},"finish_reason":null}]}\n\ndata: [DONE]\n\n')


@pytest.fixture(scope="module")
def broken_cloud():
    """A real HTTP server whose /fail/v1 answers 500, /slow/v1 answers after 5 s, /drip/v1 sends a keep-alive
    comment every 0.2 s for 20 s (no read ever times out), /gzip/v1 streams gzip-compressed events and /hold/v1
    answers once `release` is set (`arrived` is set when a request is there); /strict/v1 keeps each body it is sent
    and, as OpenAI's API does, answers 400 to an argument OpenAI does not define."""
    app = FastAPI()
    app.state.release, app.state.arrived = threading.Event(), threading.Event()
    received: list = []

    @app.post("/strict/v1/chat/completions")
    async def strict(request: Request):
        body = await request.json()
        received.append(body)
        unknown = sorted(set(body) - OPENAI_CHAT_ARGUMENTS)
        if unknown:
            return JSONResponse({"error": {"message": f"Unrecognized request argument supplied: {unknown[0]}"}},
                                status_code=400)
        return JSONResponse({"id": "c3", "object": "chat.completion", "created": 0, "model": CLOUD_ID,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the cloud"},
                                          "finish_reason": "stop"}]})

    @app.post("/drip/v1/chat/completions")
    async def drip():
        async def pings():
            for _ in range(100):
                yield b": ping\n\n"
                await asyncio.sleep(0.2)
        return StreamingResponse(pings(), media_type="text/event-stream")

    @app.post("/gzip/v1/chat/completions")
    async def compressed():
        return Response(gzip.compress(CLOUD_STREAM.encode()), media_type="text/event-stream",
                        headers={"Content-Encoding": "gzip"})

    @app.post("/hold/v1/chat/completions")
    async def hold():
        app.state.arrived.set()
        await asyncio.to_thread(app.state.release.wait, 30)
        return JSONResponse({"id": "c2", "object": "chat.completion", "created": 0, "model": CLOUD_ID,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "held"},
                                          "finish_reason": "stop"}]})

    @app.post("/fail/v1/chat/completions")
    async def fail():
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)

    @app.post("/slow/v1/chat/completions")
    async def slow():
        await asyncio.sleep(5)
        return JSONResponse({"error": {"message": "too late"}}, status_code=500)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield BrokenCloud(f"http://127.0.0.1:{port}", app.state.release, app.state.arrived, received)
    app.state.release.set()
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def local_server(tiny_gguf, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    started = []

    def start(max_upstream: int = 16, max_queue: int = 16, **router_options):
        model = open_model(tiny_gguf)
        router = RouterConfig(key_env=KEY_ENV, upstream_model=CLOUD_ID, **router_options)
        running = start_server_thread(model, ServerConfig(port=0, router=router, max_upstream=max_upstream,
                                                          max_queue=max_queue))
        started.append((running, model))
        return running

    yield start
    for running, model in started:
        running.stop()
        model.close()


def chat(url: str, model: str = MODEL_ID, messages=MESSAGES, stream: bool = False) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=30,
                      json={"model": model, "messages": messages, "max_tokens": 6, "temperature": 0,
                            "stream": stream})


def test_low_confidence_escalates_and_high_confidence_stays_local(local_server, cloud):
    unsure = local_server(policy="auto", upstream_url=f"{cloud.url}/v1", min_mean_logprob=0.0)  # always below
    answer = chat(unsure.url)
    assert answer.status_code == 200 and answer.headers["x-edgepack-route"] == "remote"
    assert answer.json()["model"] == CLOUD_ID
    sure = local_server(policy="auto", upstream_url=f"{cloud.url}/v1", min_mean_logprob=-1e9)
    answer = chat(sure.url)
    assert answer.headers["x-edgepack-route"] == "local" and answer.json()["model"] == MODEL_ID
    assert answer.json()["choices"][0]["logprobs"] is None  # scored internally, not returned unasked
    streamed = chat(sure.url, stream=True)
    assert streamed.headers["x-edgepack-route"] == "local" and '"logprobs":{' not in streamed.text
    assert streamed.text.endswith("data: [DONE]\n\n")
    health = httpx.get(f"{sure.url}/health").json()
    assert health["answers"] == {"local": 2} and health["local_share"] == 1.0


def test_rules_send_requests_upstream_before_generating(local_server, cloud):
    server = local_server(policy="auto", upstream_url=f"{cloud.url}/v1", min_mean_logprob=-1e9,
                          patterns=("(?i)\\bprove\\b",))
    assert chat(server.url, model=CLOUD_ID).headers["x-edgepack-route"] == "remote"
    assert chat(server.url, messages=[{"role": "user", "content": "Prove it."}]).headers["x-edgepack-route"] == \
        "remote"
    long_prompt = [{"role": "user", "content": "sea " * 110}]  # ~330 tokens: > 256 local, < 512 upstream
    answer = chat(server.url, messages=long_prompt)
    assert answer.status_code == 200 and answer.headers["x-edgepack-route"] == "remote"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'edgepack_answers_total{route="remote"} 3' in metrics


def test_streaming_escalation_relays_the_upstream_stream(local_server, cloud):
    server = local_server(policy="auto", upstream_url=f"{cloud.url}/v1", min_mean_logprob=0.0)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with client.chat.completions.with_streaming_response.create(model=MODEL_ID, messages=MESSAGES, max_tokens=6,
                                                                temperature=0, stream=True) as response:
        assert response.headers["x-edgepack-route"] == "remote"
        chunks = list(response.parse())
    assert chunks and all(c.model == CLOUD_ID for c in chunks)


@pytest.mark.parametrize("where, timeout", [("down", 5.0), ("fail", 5.0), ("slow", 0.5)])
def test_upstream_down_failing_or_slow_falls_back_to_the_local_answer(local_server, broken_cloud, where, timeout):
    url = {"down": f"http://127.0.0.1:{free_port()}/v1", "fail": f"{broken_cloud.url}/fail/v1",
           "slow": f"{broken_cloud.url}/slow/v1"}[where]
    server = local_server(policy="auto", upstream_url=url, min_mean_logprob=0.0, timeout_s=timeout)
    started = time.monotonic()
    answer = chat(server.url)
    assert answer.status_code == 200 and answer.headers["x-edgepack-route"] == "local-fallback"
    assert answer.json()["model"] == MODEL_ID and answer.json()["choices"][0]["message"]["content"] is not None
    assert time.monotonic() - started < 4.5  # the slow upstream was not waited for
    streamed = chat(server.url, stream=True)
    assert streamed.headers["x-edgepack-route"] == "local-fallback" and streamed.text.endswith("data: [DONE]\n\n")
    # remote policy with the upstream down: the local model still answers
    remote = local_server(policy="remote", upstream_url=url, timeout_s=timeout)
    assert chat(remote.url).headers["x-edgepack-route"] == "local-fallback"


def test_the_upstream_timeout_covers_the_whole_call_not_each_read(local_server, broken_cloud):
    server = local_server(policy="remote", upstream_url=f"{broken_cloud.url}/drip/v1", timeout_s=1.0)
    started = time.monotonic()
    answer = chat(server.url)
    assert answer.status_code == 200 and answer.headers["x-edgepack-route"] == "local-fallback"
    assert time.monotonic() - started < 5  # the upstream would have kept it for 20 s
    started = time.monotonic()
    streamed = chat(server.url, stream=True)  # the stream had begun: it ends with an error event
    assert streamed.headers["x-edgepack-route"] == "remote" and time.monotonic() - started < 5
    events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert "upstream timed out after 1 s" in events[-2] and events[-1] == "data: [DONE]"


def test_a_compressed_upstream_stream_is_relayed_decoded(local_server, broken_cloud):
    server = local_server(policy="remote", upstream_url=f"{broken_cloud.url}/gzip/v1")
    streamed = chat(server.url, stream=True)
    assert streamed.status_code == 200 and streamed.headers["x-edgepack-route"] == "remote"
    assert streamed.text == CLOUD_STREAM


def test_upstream_requests_have_a_bound_of_their_own(local_server, broken_cloud):
    from concurrent.futures import ThreadPoolExecutor

    server = local_server(policy="remote", upstream_url=f"{broken_cloud.url}/hold/v1", max_upstream=1, max_queue=0)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(chat, server.url)
        assert broken_cloud.arrived.wait(10)
        busy = chat(server.url)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "upstream_busy"
        assert busy.headers["retry-after"]
        broken_cloud.release.set()
        first = held.result()
    assert first.status_code == 200 and first.headers["x-edgepack-route"] == "remote"
    assert first.json()["choices"][0]["message"]["content"] == "held"


def test_upstream_streams_that_fail_to_open_give_their_place_back(local_server):
    server = local_server(policy="remote", upstream_url=f"http://127.0.0.1:{free_port()}/v1", max_upstream=1)
    for _ in range(3):  # with the place kept, the second would be answered 503
        streamed = chat(server.url, stream=True)
        assert streamed.status_code == 200 and streamed.headers["x-edgepack-route"] == "local-fallback"


def test_a_backtracking_route_pattern_or_a_1_mb_prompt_cannot_freeze_the_server(local_server, cloud):
    from concurrent.futures import ThreadPoolExecutor

    server = local_server(policy="auto", upstream_url=f"{cloud.url}/v1", min_mean_logprob=-1e9,
                          patterns=("(a|aa)+$",))  # exponential on "aaaa…!" (about 40 minutes at 40 a's in re)
    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(chat, server.url, MODEL_ID, [{"role": "user", "content": "a" * 40 + "!"}])
        huge = pool.submit(chat, server.url, MODEL_ID, [{"role": "user", "content": "sea " * 2**18}])  # 1 MB
        waits = []
        while not (pending.done() and huge.done()):
            started = time.perf_counter()
            assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
            waits.append(time.perf_counter() - started)
            time.sleep(0.02)
        answer = pending.result()
    assert answer.status_code == 200 and answer.headers["x-edgepack-route"] == "local"  # gave up: not a match
    # too long here and for the upstream's 512 tokens too: a clear 502 that says so
    assert huge.result().status_code == 502 and "too long" in huge.result().json()["error"]["message"]
    assert max(waits) < 1.0, waits


def test_a_prompt_too_long_for_both_is_a_clear_502_when_upstream_is_down(local_server):
    server = local_server(policy="auto", upstream_url=f"http://127.0.0.1:{free_port()}/v1")
    answer = chat(server.url, messages=[{"role": "user", "content": "sea " * 300}])
    assert answer.status_code == 502
    assert "too long for the local model" in answer.json()["error"]["message"]


def test_the_upstream_key_never_appears_in_responses_or_logs(local_server, cloud, caplog):
    caplog.set_level(logging.DEBUG)
    server = local_server(policy="auto", upstream_url=f"{cloud.url}/v1", min_mean_logprob=0.0)
    seen = []
    for stream in (False, True):
        response = chat(server.url, stream=stream)
        assert response.headers["x-edgepack-route"] == "remote"  # the key reached the upstream, which checks it
        seen += [response.text, json.dumps(dict(response.headers))]
    seen += [httpx.get(f"{server.url}/metrics").text, httpx.get(f"{server.url}/health").text, caplog.text]
    assert all(SECRET not in text for text in seen)
    assert "key_env" not in json.dumps(httpx.get(f"{server.url}/health").json())


def test_policy_needs_an_upstream_and_bad_patterns_are_refused(tiny_gguf):
    with pytest.raises(EdgepackError, match="needs --upstream URL and --upstream-model"):
        RouterConfig(policy="auto").check_ready()
    with pytest.raises(EdgepackError, match="not a valid regular expression"):
        RouterConfig(policy="auto", patterns=("(",))
    with pytest.raises(EdgepackError, match="routing policy 'sometimes'"):
        RouterConfig(policy="sometimes")


@pytest.mark.parametrize(("url", "allow", "refused"), [
    ("http://api.example.com/v1", False, "unencrypted"), ("ftp://api.example.com/v1", False, "not an http(s) URL"),
    ("https://api.example.com/v1", False, None), ("http://127.0.0.1:9000/v1", False, None),
    ("http://localhost:9000/v1", False, None), ("http://[::1]:9000/v1", False, None),
    ("http://10.0.0.5:8000/v1", True, None)])
def test_plain_http_upstreams_off_this_machine_need_a_flag(url, allow, refused):
    config = RouterConfig(policy="remote", upstream_url=url, upstream_model="m", allow_insecure_upstream=allow)
    if refused is None:
        config.check_ready()
    else:
        with pytest.raises(EdgepackError, match=re.escape(refused)):
            config.check_ready()


def test_a_refused_upstream_url_is_named_without_its_credentials():
    config = RouterConfig(policy="remote", upstream_url="http://user:pa55word@api.example.com/v1?key=s3cret",
                          upstream_model="m")
    with pytest.raises(EdgepackError) as info:
        config.check_ready()
    assert "http://api.example.com/v1" in str(info.value)
    assert "pa55word" not in str(info.value) and "s3cret" not in str(info.value)


def test_calibrate_keeps_the_asked_share_local_and_the_server_follows_it(tiny_gguf, cloud, tmp_path, monkeypatch):
    topics = ["the sea", "a boat", "the wind", "fish", "a lighthouse", "rain", "the harbour", "gulls", "nets",
              "the tide"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Tell me about {t}."}]})
                                 for t in topics) + "\n")
    config = tmp_path / "router.json"
    RouterConfig(policy="auto", upstream_url=f"{cloud.url}/v1", upstream_model=CLOUD_ID,
                 key_env=KEY_ENV).to_file(config)
    done = subprocess.run([sys.executable, "-m", "edgepack", "route", "calibrate", str(prompts), "--model",
                           str(tiny_gguf), "--local-share", "0.7", "--config", str(config), "--max-tokens", "6",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["local_share"] == 0.7 and result["prompts"] == 10
    written = json.loads(config.read_text())
    assert written["min_mean_logprob"] == round(result["threshold"], 6) and written["upstream_model"] == CLOUD_ID
    assert SECRET not in config.read_text()

    monkeypatch.setenv(KEY_ENV, SECRET)
    model = open_model(tiny_gguf, context=CONTEXT)
    running = start_server_thread(model, ServerConfig(port=0, router=RouterConfig.from_file(config)))
    try:
        routes = []
        for t in topics:
            answer = httpx.post(f"{running.url}/v1/chat/completions", timeout=30, json={
                "model": MODEL_ID, "messages": [{"role": "user", "content": f"Tell me about {t}."}],
                "max_tokens": 6, "temperature": 0})
            routes.append(answer.headers["x-edgepack-route"])
        assert routes.count("local") == 7 and routes.count("remote") == 3
        assert httpx.get(f"{running.url}/health").json()["local_share"] == 0.7
    finally:
        running.stop()
        model.close()


def test_router_config_file_errors(tmp_path: Path):
    bad = tmp_path / "r.json"
    bad.write_text('{"policy": "auto", "api_key": "x"}')
    with pytest.raises(EdgepackError, match="unknown field 'api_key'"):
        RouterConfig.from_file(bad)
    with pytest.raises(EdgepackError, match="does not exist"):
        RouterConfig.from_file(tmp_path / "missing.json")


def test_the_upstream_gets_only_what_the_client_set_with_its_asks_capped(local_server, broken_cloud):
    server = local_server(policy="remote", upstream_url=f"{broken_cloud.url}/strict/v1", upstream_max_tokens=64)
    answer = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                        json={"model": MODEL_ID, "messages": MESSAGES, "temperature": 0.2, "top_k": 5,
                              "max_tokens": 4000})
    assert answer.status_code == 200 and answer.headers[ROUTE_HEADER] == "remote"
    sent = broken_cloud.received[-1]
    assert sent == {"model": CLOUD_ID, "messages": MESSAGES, "temperature": 0.2, "max_tokens": 64, "stream": False}
    unbounded = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                           json={"model": MODEL_ID, "messages": MESSAGES})
    assert unbounded.status_code == 200 and broken_cloud.received[-1]["max_tokens"] == 64
    many = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                      json={"model": MODEL_ID, "messages": MESSAGES, "n": 8})
    assert many.status_code == 400 and many.json()["error"]["param"] == "n"
    assert len(broken_cloud.received) == 2
