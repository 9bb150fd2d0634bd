"""The OpenAI-compatible server, started for real on 127.0.0.1 over a tiny GGUF, driven by the official `openai`
client: chat and completions (streaming and not), logprobs, seeds, auth, error shapes, the queue bound,
cancellation on disconnect, /health and /metrics."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import openai
import pytest
from serving_helpers import CONTEXT, MESSAGES, MODEL_ID, GatedModel, open_model, wait_until

from edgepack.serve.app import ServerConfig, start_server_thread
from edgepack.serve.model import LocalModel


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_chat_non_streaming_and_streaming_agree(client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL_ID, messages=MESSAGES, max_tokens=12,
                                                           temperature=0)
    assert raw.headers["x-edgepack-route"] == "local"
    whole = raw.parse()
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == choice.message.content
    assert finish == choice.finish_reason and usage.completion_tokens == whole.usage.completion_tokens


def test_completions_count_tokens_and_stream(client, server):
    whole = client.completions.create(model=MODEL_ID, prompt="The sea and the", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt="The sea and the", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_logprobs_seed_and_stop(client):
    answer = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=8, temperature=0,
                                            logprobs=True)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens and all(e.logprob <= 0 for e in entries)
    assert "".join(e.token for e in entries) == answer.choices[0].message.content
    first = client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=10, temperature=1.0, seed=7)
    second = client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=10, temperature=1.0, seed=7)
    assert first.choices[0].text == second.choices[0].text
    text = first.choices[0].text
    if len(text) > 3:
        stop = text[2:4]
        stopped = client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=10, temperature=1.0, seed=7,
                                            stop=[stop])
        assert stopped.choices[0].text == text[:text.index(stop)] and stopped.choices[0].finish_reason == "stop"


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_ID


@pytest.mark.parametrize("body, status, expected", [
    ('{"model": "tiny-chat", "messages": [', 400, "not valid JSON"),
    ({"model": MODEL_ID, "messages": MESSAGES, "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL_ID, "messages": MESSAGES, "tools_choice": "auto"}, 400,
     "Unrecognized request argument supplied: tools_choice"),
    ({"model": MODEL_ID, "messages": []}, 400, "messages"),
    ({"model": MODEL_ID, "messages": MESSAGES, "n": 9}, 400, "n: Input should be less than or equal to 8"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "sea " * 400}]}, 400,
     f"maximum context length is {CONTEXT} tokens"),
])
def test_errors_use_openai_shape(server, body, status, expected):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}/v1/chat/completions", content=content,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert expected in error["message"] and error["type"] in ("invalid_request_error", "server_error")
    if "context length" in expected:
        assert error["code"] == "context_length_exceeded"


def test_any_model_name_or_none_is_answered_by_the_one_local_model(client, server):
    """As llama-server and Ollama do: the one model served answers whatever name a client was set up with."""
    named = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0)
    other = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=6, temperature=0)
    unnamed = httpx.post(f"{server.url}/v1/chat/completions",
                         json={"messages": MESSAGES, "max_tokens": 6, "temperature": 0}).json()
    assert other.choices[0].message.content == named.choices[0].message.content
    assert unnamed["choices"][0]["message"]["content"] == named.choices[0].message.content
    assert unnamed["model"] == other.model == MODEL_ID


def test_n_choices_are_made_side_by_side_each_as_its_own_request_would_be(tiny_gguf):
    """n = 3 with a seed: choice i is the answer a single request with seed + i gets; streamed, the choices' pieces
    come tagged with their index and add up to the same answers."""
    model = open_model(tiny_gguf, parallel=3)
    running = start_server_thread(model, ServerConfig(port=0))
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
    sampled = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0}
    try:
        whole = client.chat.completions.create(**sampled, n=3, seed=40)
        assert [c.index for c in whole.choices] == [0, 1, 2]
        singles = [client.chat.completions.create(**sampled, seed=40 + i) for i in range(3)]
        alone = [single.choices[0].message.content for single in singles]
        assert [c.message.content for c in whole.choices] == alone
        assert whole.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)
        assert whole.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt is counted once
        pieces, finishes = {0: "", 1: "", 2: ""}, {}
        for chunk in client.chat.completions.create(**sampled, n=3, seed=40, stream=True):
            for choice in chunk.choices:
                pieces[choice.index] += choice.delta.content or ""
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
        assert [pieces[i] for i in range(3)] == alone and sorted(finishes) == [0, 1, 2]
    finally:
        running.stop()
        model.close()


def test_model_aliases_are_listed(tiny_gguf):
    model = open_model(tiny_gguf)
    running = start_server_thread(model, ServerConfig(port=0, model_aliases=("gpt-3.5-turbo", MODEL_ID)))
    try:
        listed = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused").models.list()
        assert [entry.id for entry in listed.data] == [MODEL_ID, "gpt-3.5-turbo"]
    finally:
        running.stop()
        model.close()


def test_openai_client_sees_the_right_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens") as info:
        client.completions.create(model=MODEL_ID, prompt="sea " * 400, max_tokens=4)
    assert info.value.code == "context_length_exceeded"


def test_api_key_is_required_on_v1_routes(tiny_gguf):
    model = open_model(tiny_gguf)
    # "x?" is allowed as a Host so that the key check, not the host check, is what answers the crafted request
    running = start_server_thread(model, ServerConfig(port=0, api_key="s3cret", allowed_hosts=("x?",)))
    try:
        wrong = openai.OpenAI(base_url=f"{running.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.post(f"{running.url}/v1/completions", json={"model": MODEL_ID, "prompt": "x"}).status_code == 401
        right = openai.OpenAI(base_url=f"{running.url}/v1", api_key="s3cret", max_retries=0)
        assert right.completions.create(model=MODEL_ID, prompt="x", max_tokens=2).usage.completion_tokens <= 2
        assert httpx.get(f"{running.url}/health").status_code == 200  # health stays open
        # /metrics needs the key too: its counts tell one client about the others' requests
        assert httpx.get(f"{running.url}/metrics").status_code == 401
        metrics = httpx.get(f"{running.url}/metrics", headers={"Authorization": "Bearer s3cret"}).text
        assert 'edgepack_requests_total{route="/v1/models",status="401"} 1' in metrics
        # a Host header that makes a rebuilt URL's path empty (Starlette < 1.0.1) must not skip the key check
        assert raw_status(running.url, b"GET /v1/models HTTP/1.1\r\nHost: x?\r\nConnection: close\r\n\r\n") == 401
    finally:
        running.stop()
        model.close()


def raw_status(url: str, request: bytes) -> int:
    """The status of a request sent byte for byte over a socket (no client library normalises it)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        head = connection.recv(64)
    return int(head.split()[1])


def test_a_host_header_that_is_not_this_server_is_refused(tiny_gguf):
    """A web page on a DNS name its owner points at 127.0.0.1 (DNS rebinding) must not reach the local server."""
    model = open_model(tiny_gguf)
    running = start_server_thread(model, ServerConfig(port=0, allowed_hosts=("edge.local",)))
    try:
        port = running.url.rsplit(":", 1)[1]
        for host, status in ((f"evil.example:{port}", 403), ("evil.example", 403), (f"localhost:{port}", 200),
                             (f"127.0.0.1:{port}", 200), (f"[::1]:{port}", 200), (f"edge.local:{port}", 200)):
            answer = httpx.get(f"{running.url}/v1/models", headers={"Host": host})
            assert answer.status_code == status, host
            if status == 403:
                assert answer.json()["error"]["code"] == "host_not_allowed"
    finally:
        running.stop()
        model.close()
    # on every bind, a DNS name is answered only when it was given; an IP address cannot be a rebinding page's
    wide = ServerConfig(host="0.0.0.0")
    assert not wide.host_allowed("anything.example:80") and not wide.host_allowed("anything.example")
    assert wide.host_allowed("192.168.1.20:8080") and wide.host_allowed("[fe80::1]:8080")
    assert ServerConfig(host="0.0.0.0", allowed_hosts=("edge.local",)).host_allowed("EDGE.local:8080")


def test_a_chat_template_that_refuses_the_messages_is_a_client_error(tiny_gguf):
    model = open_model(tiny_gguf)
    # as Gemma's and Mistral's templates do for roles they do not take
    model.runtime._chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                                    "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    running = start_server_thread(model, ServerConfig(port=0))
    try:
        answer = httpx.post(f"{running.url}/v1/chat/completions", json={"model": MODEL_ID, "messages": MESSAGES})
        assert answer.status_code == 400
        assert "chat template refused these messages: System role not supported" in answer.json()["error"]["message"]
        fine = httpx.post(f"{running.url}/v1/chat/completions",
                          json={"model": MODEL_ID, "messages": MESSAGES[1:], "max_tokens": 2})
        assert fine.status_code == 200
    finally:
        running.stop()
        model.close()


class FailingMidway(LocalModel):
    """An engine that breaks after its first token."""

    def submit(self, *_):
        return False  # the server streams through stream_ids below

    def stream_ids(self, prompt_ids, options, cancel=None):
        for index, chunk in enumerate(super().stream_ids(prompt_ids, options, cancel)):
            if index == 1:
                raise RuntimeError("the engine lost its KV cache")
            yield chunk


def test_a_stream_that_fails_midway_ends_with_an_error_event(tiny_gguf):
    model = open_model(tiny_gguf, cls=FailingMidway)
    running = start_server_thread(model, ServerConfig(port=0))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        # the client gets the request's id, not the exception's text (the log has it)
        with pytest.raises(openai.APIError, match=r"generation failed midway \(request id req_\w+\)"):
            for _ in client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=8, stream=True,
                                                    temperature=0):
                pass
        metrics = httpx.get(f"{running.url}/metrics").text
        assert "edgepack_in_flight_requests 0" in metrics
        assert httpx.get(f"{running.url}/health").status_code == 200
    finally:
        running.stop()
        model.close()


def test_bodies_over_the_limit_are_refused_before_parsing(tiny_gguf):
    model = open_model(tiny_gguf)
    running = start_server_thread(model, ServerConfig(port=0, max_body_bytes=64 * 1024))
    try:
        big = {"model": MODEL_ID, "prompt": "sea " * 40_000, "max_tokens": 1}  # ~160 KB
        declared = httpx.post(f"{running.url}/v1/completions", json=big)
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

        def chunked():  # no Content-Length: the limit is counted as the body arrives
            yield b'{"model": "tiny-chat", "prompt": "'
            for _ in range(40):
                yield b"sea " * 1000
            yield b'"}'

        streamed = httpx.post(f"{running.url}/v1/completions", content=chunked(),
                              headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "65536 bytes" in streamed.json()["error"]["message"]
        small = httpx.post(f"{running.url}/v1/completions", json={"model": MODEL_ID, "prompt": "sea", "max_tokens": 2})
        assert small.status_code == 200
    finally:
        running.stop()
        model.close()


def test_metrics_keep_one_series_for_every_unknown_path(client, server):
    def series() -> set[str]:
        text = httpx.get(f"{server.url}/metrics").text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("edgepack_requests_total")}

    httpx.get(f"{server.url}/health")
    series()  # /metrics itself is counted once it has answered
    before = series()
    with httpx.Client() as session:
        for index in range(300):
            session.get(f"{server.url}/probe-{index}/%0a{'x' * (index % 7)}")
    added = series() - before
    assert added <= {'edgepack_requests_total{route="other",status="404"}'}
    assert 'edgepack_requests_total{route="other",status="404"}' in series()
    from prometheus_client.parser import text_string_to_metric_families

    families = {family.name for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    assert {"edgepack_requests", "edgepack_in_flight_requests", "edgepack_time_to_first_token_seconds"} <= families


@pytest.mark.parametrize(("field", "value", "says"), [
    ("seed", -2, "seed"), ("seed", 2**64, "seed"), ("stop", ["x" * 300], "stop"), ("stop", ["a", "b", "c", "d", "e"],
                                                                                  "stop"), ("stop", [""], "stop")])
def test_out_of_range_seeds_and_stops_are_client_errors(client, server, field, value, says):
    answer = httpx.post(f"{server.url}/v1/completions",
                        json={"model": MODEL_ID, "prompt": "sea", "max_tokens": 2, field: value})
    assert answer.status_code == 400 and says in answer.json()["error"]["message"]


def test_the_queue_is_bounded_with_503_and_retry_after(tiny_gguf):
    model = open_model(tiny_gguf, cls=GatedModel)
    running = start_server_thread(model, ServerConfig(port=0, max_queue=2, retry_after_s=3))
    body = {"model": MODEL_ID, "prompt": "The sea", "max_tokens": 3}
    try:
        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(httpx.post, f"{running.url}/v1/completions", json=body, timeout=60)
                    for _ in range(3)]
            deadline = time.monotonic() + 10
            while "edgepack_in_flight_requests 3" not in httpx.get(f"{running.url}/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert "edgepack_queue_depth 2" in httpx.get(f"{running.url}/metrics").text
            busy = httpx.post(f"{running.url}/v1/completions", json=body, timeout=10)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "3"
            assert busy.json()["error"]["code"] == "queue_full"
            assert model.tokenized == 3  # the refused request's prompt was never tokenized
            model.gate.set()
            assert [f.result().status_code for f in held] == [200, 200, 200]
        metrics = httpx.get(f"{running.url}/metrics").text
        assert 'edgepack_requests_total{route="/v1/completions",status="503"} 1' in metrics
        assert "edgepack_in_flight_requests 0" in metrics
    finally:
        model.gate.set()
        running.stop()
        model.close()


def test_a_client_that_disconnects_mid_stream_stops_its_generation(tiny_gguf):
    model = open_model(tiny_gguf, cls=GatedModel)
    model.gate.set()
    running = start_server_thread(model, ServerConfig(port=0))
    try:
        with httpx.stream("POST", f"{running.url}/v1/completions", timeout=30,
                          json={"model": MODEL_ID, "prompt": "The sea", "max_tokens": 200, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one token, then hang up
        wait_until(lambda: model.finished, 10, "the generation did not stop after the client left")
        reason, made = model.finished[0]
        assert reason == "cancelled" and made < 100
        # the engine is free again
        answer = httpx.post(f"{running.url}/v1/completions", timeout=30,
                            json={"model": MODEL_ID, "prompt": "The sea", "max_tokens": 2})
        assert answer.status_code == 200
    finally:
        running.stop()
        model.close()


def test_metrics_count_requests_tokens_and_first_token_time(client, server):
    client.completions.create(model=MODEL_ID, prompt="The sea", max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['edgepack_requests_total{route="/v1/completions",status="200"}']) >= 1
    assert float(lines["edgepack_completion_tokens_total"]) >= 1 and float(lines["edgepack_prompt_tokens_total"]) >= 1
    assert float(lines["edgepack_time_to_first_token_seconds_count"]) >= 1
    assert float(lines["edgepack_decode_tokens_per_second"]) > 0


def test_embedded_load_chat_complete_and_serve(tiny_gguf):
    import edgepack

    model = edgepack.load(tiny_gguf, context=CONTEXT)
    try:
        reply = model.chat(MESSAGES, max_tokens=6)
        streamed = "".join(model.chat(MESSAGES, max_tokens=6, stream=True))
        assert streamed == reply.text and reply.completion_tokens <= 6
        assert "".join(model.complete("The sea", max_tokens=4, stream=True)) == \
            model.complete("The sea", max_tokens=4).text
        running = model.serve(port=0)
        try:
            client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
            served = client.chat.completions.create(model=model.model_id, messages=MESSAGES, max_tokens=6,
                                                    temperature=0)
            assert served.choices[0].message.content == reply.text
        finally:
            running.stop()
    finally:
        model.close()


def test_an_onnx_variant_is_served_the_same_way(tiny_onnx):
    """Our ONNX graph behind the server: streaming, structured output (a grammar over its tokenizer.gguf) and
    several requests at once through its batch scheduler, each answered as it would be alone (that decode steps are
    really shared is tests/runtimes/test_batching.py's)."""
    jsonschema = pytest.importorskip("jsonschema")
    model = open_model(tiny_onnx, parallel=3)
    assert model.runtime.name == "onnxrt" and model.runtime.generates_concurrently
    running = start_server_thread(model, ServerConfig(port=0))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        whole = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0, stream=True) if c.choices)
        assert streamed == whole.choices[0].message.content and whole.usage.completion_tokens <= 6

        # the tiny model's weights are random: an enum keeps its strings whole characters
        schema = {"type": "object", "properties": {"size": {"enum": ["S", "M", "L"]}, "count": {"type": "integer"}},
                  "required": ["size", "count"]}
        answer = client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, max_tokens=60, temperature=1.0, seed=4,
            response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": schema}})
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)

        questions = [[{"role": "user", "content": text}] for text in ("Name a colour.", "Count to three.", "Hi!")]

        def ask(messages):
            return client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12,
                                                  temperature=0).choices[0].message.content

        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(ask, questions))
        assert together == [ask(messages) for messages in questions]
    finally:
        running.stop()
        model.close()


def test_health_says_loading_until_the_model_is_loaded_and_why_a_load_failed(tiny_gguf):
    import uvicorn

    from edgepack.serve.app import create_app

    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return open_model(tiny_gguf)

    def failing_loader():
        raise RuntimeError("weights are corrupt")

    for loader in (slow_loader, failing_loader):
        app = create_app(ServerConfig(port=0), loader=loader)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        try:
            if loader is slow_loader:
                assert httpx.get(f"{url}/health").status_code == 503
                busy = httpx.get(f"{url}/v1/models")
                assert busy.status_code == 503 and busy.json()["error"]["code"] == "model_not_ready"
                release.set()
                deadline = time.monotonic() + 30
                while httpx.get(f"{url}/health").status_code != 200:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == MODEL_ID
                app.state.edgepack.model.close()
            else:
                deadline = time.monotonic() + 10
                while (health := httpx.get(f"{url}/health")).status_code == 503:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                assert health.status_code == 500 and "weights are corrupt" in health.json()["error"]
        finally:
            server.should_exit = True
            thread.join(timeout=10)


def test_a_gpu_the_engine_cannot_use_falls_back_to_the_cpu_and_says_so(tiny_gguf):
    from edgepack.serve.session import defaults_for, open_session

    defaults = defaults_for(tiny_gguf)
    try:
        import llama_cpp

        if llama_cpp.llama_supports_gpu_offload():
            pytest.skip("this llama-cpp-python can offload to a GPU")
    except ImportError:
        pytest.skip("no llama-cpp-python")
    model = open_session(replace(defaults, device="cuda"), context=CONTEXT)
    try:
        assert model.runtime.device == "cpu" and "no GPU offload" in model.device_note
        running = start_server_thread(model, ServerConfig(port=0))
        try:
            health = httpx.get(f"{running.url}/health").json()
            assert health["device"] == "cpu" and "running on the CPU" in health["device_note"]
        finally:
            running.stop()
    finally:
        model.close()
