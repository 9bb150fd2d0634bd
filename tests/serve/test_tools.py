"""Tool calling: which templates take tools, reading calls out of answers (whole and streamed, checked against
hand-written answers), the grammar that forces a call, and the openai client's tool-calling flow through the real
server on a tiny model whose chat template takes tools."""

from __future__ import annotations

import json

import openai
import pytest
from serving_helpers import MESSAGES, MODEL_ID, open_model
from synth_models import TOOLS_CHAT_TEMPLATE

from edgepack.core.errors import EdgepackError
from edgepack.serve.app import ServerConfig, start_server_thread
from edgepack.serve.tools import ToolCallStream, parse_tool_calls, template_takes_tools, tool_format
from edgepack.student.tiny import CHATML_TEMPLATE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city over the next days.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                    "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What is the weather in Oslo for three days?"}]


def test_templates_that_take_tools_and_their_formats():
    assert template_takes_tools(TOOLS_CHAT_TEMPLATE) and not template_takes_tools(CHATML_TEMPLATE)
    assert tool_format(TOOLS_CHAT_TEMPLATE) == "hermes"
    llama3_like = "{% if tools %}{{ 'Respond with {\"name\": name, \"parameters\": args}' }}{% endif %}<|python_tag|>"
    assert tool_format(llama3_like) == "llama3-json"
    with pytest.raises(EdgepackError, match="no tool support"):
        tool_format(CHATML_TEMPLATE)
    with pytest.raises(EdgepackError, match="not one this server reads"):
        tool_format("{% for t in tools %}{{ t }}{% endfor %}")


HERMES_ANSWERS = [  # (answer, content, [(name, arguments)])
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>', "",
     [("get_weather", {"city": "Oslo", "days": 3})]),
    ('Let me look.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Lima", "days": 1}}</tool_call>', "Let me look.",
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Lima", "days": 1})]),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>', None, []),  # broken JSON stays content
    ("No call here, only <b>text</b> and a < sign.", None, []),
]


@pytest.mark.parametrize(("answer", "content", "calls"), HERMES_ANSWERS)
def test_hermes_calls_are_read_whole_and_streamed_in_pieces_of_every_size(answer, content, calls):
    expected_content = answer if content is None else content
    parsed = parse_tool_calls(answer, "hermes")
    assert parsed.content == expected_content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls
    for size in range(1, len(answer) + 1):
        stream = ToolCallStream("hermes")
        events = []
        for at in range(0, len(answer), size):
            events += stream.feed(answer[at:at + size])
        events += stream.finish()
        streamed_content = "".join(e.content for e in events if e.call is None)
        assert streamed_content.strip() == expected_content.strip(), size
        assert [(e.call.name, json.loads(e.call.arguments)) for e in events if e.call] == calls, size


def test_llama3_json_calls():
    parsed = parse_tool_calls('<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 5}}', "llama3-json")
    assert parsed.content == "" and [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("add", {"a": 2, "b": 5})]
    assert parse_tool_calls("The answer is 7.", "llama3-json").tool_calls == ()
    stream = ToolCallStream("llama3-json")
    events = stream.feed("The answer") + stream.feed(" is 7.") + stream.finish()
    assert "".join(e.content for e in events) == "The answer is 7." and not any(e.call for e in events)


@pytest.fixture(scope="module")
def tools_server(tiny_tools_gguf):
    model = open_model(tiny_tools_gguf, parallel=2, context=1536)  # the tools JSON alone is ~500 tiny tokens
    running = start_server_thread(model, ServerConfig(port=0))
    yield running
    running.stop()
    model.close()


@pytest.fixture()
def client(tools_server):
    return openai.OpenAI(base_url=f"{tools_server.url}/v1", api_key="unused", max_retries=0)


def test_tools_on_a_model_whose_template_takes_none_are_refused(tiny_gguf):
    model = open_model(tiny_gguf)
    running = start_server_thread(model, ServerConfig(port=0))
    try:
        with pytest.raises(openai.BadRequestError, match="no tool support") as info:
            openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused").chat.completions.create(
                model=MODEL_ID, messages=MESSAGES, tools=[WEATHER])
        assert info.value.body["param"] == "tools"
    finally:
        running.stop()
        model.close()


def test_a_named_tool_choice_makes_a_valid_call_and_the_flow_round_trips(client):
    jsonschema = pytest.importorskip("jsonschema")
    answer = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[WEATHER, ADD], temperature=0,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=200)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert len(calls) >= 1 and all(call.function.name == "get_weather" for call in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the openai client's flow: the assistant's calls and each result go back, and the model answers
    follow_up = ASK + [choice.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "clear", "celsius": 4})}
        for call in calls]
    final = client.chat.completions.create(model=MODEL_ID, messages=follow_up, tools=[WEATHER, ADD],
                                           max_tokens=8, temperature=0)
    assert final.choices[0].message.role == "assistant" and final.choices[0].finish_reason in (
        "stop", "length", "tool_calls")


def test_required_tool_calls_stream_as_deltas_equal_to_the_whole_answer(client):
    options = {"model": MODEL_ID, "messages": ASK, "tools": [WEATHER, ADD], "tool_choice": "required",
               "temperature": 0, "max_tokens": 200, "parallel_tool_calls": False}
    whole = client.chat.completions.create(**options).choices[0]
    streamed, finish = {}, None
    for chunk in client.chat.completions.create(**options, stream=True):
        for delta_call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            streamed[delta_call.index] = (delta_call.function.name, delta_call.function.arguments)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == whole.finish_reason == "tool_calls"
    assert list(streamed.values()) == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert len(whole.message.tool_calls) == 1  # parallel_tool_calls false: one call


def test_an_unknown_tool_choice_is_a_client_error(client):
    with pytest.raises(openai.BadRequestError, match="no tool named 'fly'"):
        client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "fly"}})
