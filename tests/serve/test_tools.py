"""Tool calling: which templates take tools, reading calls out of answers (whole and streamed, checked against
hand-written answers), the grammar that forces a call, and the openai client's tool-calling flow through the real
server on a tiny model whose chat template takes tools."""

from __future__ import annotations

import json

import jsonschema
import llama_cpp
import openai
import pytest
from llama_cpp.llama_grammar import LlamaGrammar
from serving_helpers import MESSAGES, MODEL_ID, grammar_takes, open_model
from synth_models import TOOLS_CHAT_TEMPLATE

from edgepack.core.errors import EdgepackError
from edgepack.serve.app import ServerConfig, start_server_thread
from edgepack.serve.protocol import ChatRequest
from edgepack.serve.tools import (
    ToolCallStream,
    parse_tool_calls,
    template_takes_tools,
    tool_call_grammar,
    tool_format,
)
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


@pytest.mark.parametrize(("template", "takes_tools"), [
    ("{# tools are not offered #}{{ 'tools' }}{{ messages }}", False),  # the word, but never the variable
    ("{% set tools = [] %}{% for t in tools %}{{ t }}{% endfor %}", False),  # its own variable, not the caller's
    ("{% if tools is defined and tools %}{{ tools | tojson }}{% endif %}", True),
    # what the engines' template environments allow beyond plain Jinja: loop controls and HF's generation tag
    ("{% for t in tools %}{% if loop.index > 3 %}{% break %}{% endif %}{{ t }}{% endfor %}", True),
    ("{{ tools }}{% generation %}{{ messages[-1]['content'] }}{% endgeneration %}", True),
    ("{% if tools %}{{ tools ", False),  # not a template
    (None, False),
])
def test_whether_a_template_takes_tools_is_read_from_its_syntax(template, takes_tools):
    assert template_takes_tools(template) is takes_tools


def calls_of(parsed_calls) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in parsed_calls]


def streamed(answer: str, fmt, size: int) -> tuple[str, list[tuple[str, dict]]]:
    """The content and calls a ToolCallStream gives for `answer` fed in pieces of `size` characters."""
    stream = ToolCallStream(fmt)
    events = []
    for at in range(0, len(answer), size):
        events += stream.feed(answer[at:at + size])
    events += stream.finish()
    return "".join(e.content for e in events if e.call is None), calls_of(e.call for e in events if e.call)


HERMES_ANSWERS = [  # (answer, content, [(name, arguments)]); content None: the answer as it is
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>', "",
     [("get_weather", {"city": "Oslo", "days": 3})]),
    ('Let me look.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": {"city": "Lima", "days": 1}}</tool_call>', "Let me look.",
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Lima", "days": 1})]),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
     '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>\n', "",
     [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n\nThat makes 3 <b>apples</b>.',
     "That makes 3 <b>apples</b>.", [("add", {"a": 1, "b": 2})]),
    ('<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 5, \\"b\\": 6}"}\n</tool_call>', "",
     [("add", {"a": 5, "b": 6})]),  # arguments written as a JSON string
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>', None, []),  # broken JSON stays content
    ('<tool_call>["add", 1, 2]</tool_call> and <tool_call>{"arguments": {}}</tool_call>', None, []),  # not calls
    ('I will call <tool_call>\n{"name": "add"', None, []),  # cut off inside a call
    ("No call here, only <b>text</b>, a < sign and <tool_", None, []),
    ("  Indented,\nwith trailing space.  \n", None, []),
]


@pytest.mark.parametrize(("answer", "content", "calls"), HERMES_ANSWERS)
def test_hermes_calls_are_read_whole_and_streamed_in_pieces_of_every_size(answer, content, calls):
    expected_content = answer if content is None else content
    parsed = parse_tool_calls(answer, "hermes")
    assert parsed.content == expected_content
    assert calls_of(parsed.tool_calls) == calls
    assert all(call.id.startswith("call_") for call in parsed.tool_calls)
    assert len({call.id for call in parsed.tool_calls}) == len(calls)
    for size in range(1, len(answer) + 1):
        assert streamed(answer, "hermes", size) == (expected_content, calls), size


LLAMA3_ANSWERS = [
    ('<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 5}}', "", [("add", {"a": 2, "b": 5})]),
    ('\n{"name": "get_weather", "parameters": {"city": "Lima", "days": 1}}\n', "",
     [("get_weather", {"city": "Lima", "days": 1})]),
    ('{"name": "add", "arguments": {"a": 1, "b": 1}}', "", [("add", {"a": 1, "b": 1})]),  # OpenAI's key
    ("The answer is 7.", None, []),
    ('{"city": "Oslo"}', None, []),  # JSON, but not a call
    ('{"name": "add", "parameters": {"a": 2,', None, []),  # cut off
    ("<|python_tag|>print(1 + 1)", None, []),  # code, not a JSON call
    ("<b>bold</b> answer", None, []),
]


@pytest.mark.parametrize(("answer", "content", "calls"), LLAMA3_ANSWERS)
def test_llama3_json_calls_are_read_whole_and_streamed_in_pieces_of_every_size(answer, content, calls):
    expected_content = answer if content is None else content
    parsed = parse_tool_calls(answer, "llama3-json")
    assert (parsed.content, calls_of(parsed.tool_calls)) == (expected_content, calls)
    for size in range(1, len(answer) + 1):
        assert streamed(answer, "llama3-json", size) == (expected_content, calls), size


def test_tool_choice_none_offers_no_tools_and_auto_forces_no_call():
    def request(**fields):
        return ChatRequest.model_validate({"model": MODEL_ID, "messages": ASK, "tools": [WEATHER], **fields})

    assert request(tool_choice="none").tools_offered() is None
    assert request().tools_offered() == request(tool_choice="auto").tools_offered() == [WEATHER]
    for choice in (None, "auto", "none"):
        assert tool_call_grammar([WEATHER, ADD], choice, "hermes", context_length=1024) is None
    with pytest.raises(EdgepackError, match="no tool named 'fly'.*get_weather, add"):
        tool_call_grammar([WEATHER, ADD], {"type": "function", "function": {"name": "fly"}}, "hermes",
                          context_length=1024)


# -- the grammars, checked by llama.cpp's own grammar engine ----------------------------------------------------------

@pytest.fixture(scope="module")
def tools_llm(tiny_tools_gguf):
    llm = llama_cpp.Llama(model_path=str(tiny_tools_gguf), n_ctx=1024, n_threads=2, verbose=False)
    yield llm
    llm.close()


NAMED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
OSLO_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'
ADD_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1.5, "b": -2}}\n</tool_call>'


@pytest.mark.parametrize(("choice", "parallel", "text", "taken"), [
    (NAMED_WEATHER, True, OSLO_CALL, True),
    (NAMED_WEATHER, True, OSLO_CALL + "\n" + OSLO_CALL, True),
    (NAMED_WEATHER, False, OSLO_CALL + "\n" + OSLO_CALL, False),  # one call only
    (NAMED_WEATHER, True, ADD_CALL, False),  # another tool than the one named
    (NAMED_WEATHER, True, OSLO_CALL.replace("Oslo", "Rome"), False),  # not in the enum
    (NAMED_WEATHER, True, OSLO_CALL.replace("3", '"three"'), False),  # not an integer
    (NAMED_WEATHER, True, OSLO_CALL.replace(', "days": 3', ""), False),  # a required property missing
    (NAMED_WEATHER, True, OSLO_CALL[:-len("</tool_call>")], False),  # not closed
    (NAMED_WEATHER, True, "It is sunny in Oslo.", False),  # no call
    ("required", True, ADD_CALL + "\n" + OSLO_CALL, True),
    ("required", False, ADD_CALL, True),
    ("required", True, ADD_CALL.replace('"add"', '"fly"'), False),
])
def test_hermes_grammar_takes_calls_that_fit_and_refuses_the_rest(tools_llm, choice, parallel, text, taken):
    grammar = tool_call_grammar([WEATHER, ADD], choice, "hermes", parallel=parallel, context_length=1024)
    assert grammar_takes(tools_llm, grammar, text) is taken


def test_llama3_grammar_takes_one_json_call_with_parameters(tools_llm):
    grammar = tool_call_grammar([WEATHER, ADD], "required", "llama3-json", context_length=1024)
    assert grammar_takes(tools_llm, grammar, '{"name": "add", "parameters": {"a": 1, "b": 2}}')
    assert not grammar_takes(tools_llm, grammar, '{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert not grammar_takes(tools_llm, grammar, OSLO_CALL)
    assert not grammar_takes(tools_llm, grammar, '{"name": "add", "parameters": {"a": 1, "b": 2}}\n{"name": "add"')


@pytest.mark.parametrize(("fmt", "choice"), [("hermes", NAMED_WEATHER), ("hermes", "required"),
                                             ("llama3-json", "required")])
def test_generation_under_a_tool_grammar_is_a_valid_call(tools_llm, fmt, choice):
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, ADD)}
    grammar = LlamaGrammar.from_string(tool_call_grammar([WEATHER, ADD], choice, fmt, context_length=1024),
                                       verbose=False)
    prompt = "<|im_start|>user\nWhat is the weather in Oslo?<|im_end|>\n<|im_start|>assistant\n"
    text = tools_llm.create_completion(prompt, grammar=grammar, max_tokens=300, temperature=0)["choices"][0]["text"]
    calls = parse_tool_calls(text, fmt).tool_calls
    assert calls, text
    for call in calls:
        assert choice == "required" or call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


# -- through the real server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tools_model(tiny_tools_gguf):
    model = open_model(tiny_tools_gguf, parallel=2, context=1536)  # the tools JSON alone is ~500 tiny tokens
    yield model
    model.close()


@pytest.fixture(scope="module")
def tools_server(tools_model):
    running = start_server_thread(tools_model, ServerConfig(port=0))
    yield running
    running.stop()


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
        # with tool_choice "none" the tools are not rendered, so the template need not take them
        answer = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused").chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, tools=[WEATHER], tool_choice="none", max_tokens=4)
        assert answer.choices[0].message.tool_calls is None
    finally:
        running.stop()
        model.close()


def test_the_prompt_lists_the_tools_and_writes_earlier_calls_and_results_as_the_template_does(tools_model):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}}
    request = ChatRequest.model_validate({"model": MODEL_ID, "tools": [WEATHER], "messages": ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'}]})
    messages = [message.for_template() for message in request.messages]
    prompt_ids = tools_model.prompt_ids(messages=messages, tools=request.tools_offered())
    rendered = tools_model.runtime.apply_chat_template(messages, tools=request.tools_offered())
    assert prompt_ids == tools_model.runtime.tokenize(rendered, add_special=False)  # markers as special tokens
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in rendered
    # the arguments reach the template as an object, so they are written once as JSON, not as a quoted string
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}'
            '\n</tool_call>\n<|im_end|>') in rendered
    assert '<|im_start|>user\n<tool_response>\n{"sky": "clear"}\n</tool_response><|im_end|>' in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


def test_a_named_tool_choice_makes_a_valid_call_and_the_flow_round_trips(client):
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


def test_a_tool_choice_without_tools_is_a_client_error(client):
    with pytest.raises(openai.BadRequestError, match="tool_choice: given without tools") as info:
        client.chat.completions.create(model=MODEL_ID, messages=ASK, tool_choice="required")
    assert info.value.body["param"] == "tool_choice"


def test_an_unknown_tool_choice_is_a_client_error(client):
    with pytest.raises(openai.BadRequestError, match="no tool named 'fly'"):
        client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "fly"}})
