"""Ollama's API on the real server, driven by the official `ollama` client; each answer is checked against what the
`openai` client gets from /v1 for the same request (an independent path to the same model)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serving_helpers import MESSAGES, MODEL_ID, open_model, wait_until

from edgepack.serve.app import ServerConfig, start_server_thread

ollama = pytest.importorskip("ollama")
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def server(tiny_gguf):
    model = open_model(tiny_gguf, parallel=2)
    running = start_server_thread(model, ServerConfig(port=0))
    yield running
    running.stop()
    model.close()


@pytest.fixture()
def client(server):
    return ollama.Client(host=server.url)


@pytest.fixture()
def openai_client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_chat_whole_and_streamed_agree_with_the_openai_route(client, openai_client):
    whole = client.chat(model="llama3.2", messages=MESSAGES, options=GREEDY)
    reference = openai_client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=12,
                                                      temperature=0)
    assert whole.message.role == "assistant"
    assert whole.message.content == reference.choices[0].message.content
    assert whole.model == "llama3.2"  # the name asked for is echoed, as Ollama does
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.eval_count == reference.usage.completion_tokens
    assert whole.prompt_eval_count == reference.usage.prompt_tokens
    assert whole.total_duration >= whole.eval_duration > 0

    pieces = list(client.chat(model="llama3.2", messages=MESSAGES, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in pieces) == whole.message.content
    assert [p.done for p in pieces].count(True) == 1 and pieces[-1].done
    assert pieces[-1].eval_count == whole.eval_count and pieces[-1].done_reason == whole.done_reason


def test_generate_templated_and_raw(client, openai_client):
    templated = client.generate(model=MODEL_ID, prompt="Say hello to the sea.", system="You are brief.",
                                options=GREEDY)
    chat = openai_client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=12, temperature=0)
    assert templated.response == chat.choices[0].message.content  # the same messages through the chat template

    raw = client.generate(model=MODEL_ID, prompt="The sea and the", raw=True, options=GREEDY)
    completion = openai_client.completions.create(model=MODEL_ID, prompt="The sea and the", max_tokens=12,
                                                  temperature=0)
    assert raw.response == completion.choices[0].text
    assert raw.eval_count == completion.usage.completion_tokens
    streamed = "".join(p.response for p in client.generate(model=MODEL_ID, prompt="The sea and the", raw=True,
                                                           options=GREEDY, stream=True))
    assert streamed == raw.response


def test_num_predict_limits_the_answer(client):
    short = client.chat(model=MODEL_ID, messages=MESSAGES, options={"temperature": 0, "num_predict": 3})
    assert short.eval_count <= 3
    if short.eval_count == 3:
        assert short.done_reason == "length"


def test_no_messages_loads_the_model_as_ollama_run_asks(client):
    loaded = client.chat(model="any:latest")
    assert loaded.done and loaded.done_reason == "load" and loaded.message.content == ""
    assert loaded.model == "any:latest"


def test_format_json_object(client):
    answer = client.generate(model=MODEL_ID, prompt="Describe the sea.", format="json",
                             options={"temperature": 0, "num_predict": 40})
    if answer.done_reason == "stop":  # a cut-off answer is an unfinished object
        assert isinstance(json.loads(answer.response), dict)
    else:
        assert answer.response.lstrip().startswith("{")


def test_format_json_gives_json(client):
    schema = {"type": "object", "properties": {"size": {"enum": ["S", "M", "L"]}, "count": {"type": "integer"}},
              "required": ["size", "count"]}
    answer = client.chat(model=MODEL_ID, messages=MESSAGES, format=schema,
                         options={"temperature": 0, "num_predict": 60})
    parsed = json.loads(answer.message.content)
    assert parsed["size"] in ("S", "M", "L") and isinstance(parsed["count"], int)


def test_list_show_ps_and_version(client, server, tiny_gguf):
    listed = client.list()
    assert [m.model for m in listed.models] == [MODEL_ID]
    assert listed.models[0].size == tiny_gguf.stat().st_size
    assert listed.models[0].details.format == "gguf" and listed.models[0].details.family == "llama"
    assert len(listed.models[0].digest) == 64 and listed.models[0].digest == client.list().models[0].digest
    shown = client.show(MODEL_ID)
    assert "im_start" in shown.template  # the tiny model's ChatML template
    assert [m.model for m in client.ps().models] == [MODEL_ID]
    assert httpx.get(f"{server.url}/api/version").json()["version"]


def test_bad_requests_are_400s_the_client_raises(client, server):
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=MODEL_ID, messages=[{"role": "user", "content": "hi", "images": ["aGk="]}])
    assert info.value.status_code == 400 and "text only" in str(info.value)
    answer = httpx.post(f"{server.url}/api/chat", json={"model": MODEL_ID, "messages": "hello"})
    assert answer.status_code == 400 and "messages" in answer.json()["error"]
    answer = httpx.post(f"{server.url}/api/chat", content=b"{not json", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "JSON" in answer.json()["error"]
    answer = httpx.post(f"{server.url}/api/chat", content=b"{}")  # no Content-Type: a form a web page can send
    assert answer.status_code == 415 and "application/json" in answer.json()["error"]
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model=MODEL_ID, messages=[{"role": "user", "content": "sea " * 400}])
    assert info.value.status_code == 400 and "context length" in str(info.value)


def test_the_api_key_guards_the_ollama_routes_too(tiny_gguf):
    model = open_model(tiny_gguf)
    running = start_server_thread(model, ServerConfig(port=0, api_key="k"))
    try:
        with pytest.raises(ollama.ResponseError) as info:
            ollama.Client(host=running.url).chat(model=MODEL_ID, messages=MESSAGES)
        assert info.value.status_code == 401 and "API key" in str(info.value)
        unknown = httpx.get(f"{running.url}/api/not-a-route")  # refused before routing, still in Ollama's shape
        assert unknown.status_code == 401 and "API key" in unknown.json()["error"]
        keyed = ollama.Client(host=running.url, headers={"Authorization": "Bearer k"})
        assert keyed.chat(model=MODEL_ID, messages=MESSAGES, options=GREEDY).done
    finally:
        running.stop()
        model.close()


def test_an_abandoned_stream_frees_its_place(client, server):
    stream = client.chat(model=MODEL_ID, messages=MESSAGES, stream=True,
                         options={"temperature": 0, "num_predict": 200})
    next(iter(stream))
    stream.close()

    def in_flight() -> float:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith("edgepack_in_flight_requests "):
                return float(line.split()[1])
        return -1

    wait_until(lambda: in_flight() == 0, 10, "the abandoned stream still holds its place")
    assert client.chat(model=MODEL_ID, messages=MESSAGES, options=GREEDY).done
