"""Structured output under hostile schemas, through `edgepack serve` started for real on 127.0.0.1 (a process of its
own, so that a crash shows as a dead server, not a dead test run), on llama.cpp and on the ONNX engine:

- a schema whose grammar llama.cpp's parser recursed on until the stack overflowed (maxLength 30000);
- a grammar no token can continue (a pattern of NULs): llama.cpp aborted the process when made to accept one;
- a minimum of 30,000,000 characters (150 bytes of request, a gigabyte of grammar);
- client mistakes that were 500s with the schema or the whole grammar in the answer and the log.
Beside them, the engine-level checks: one sequence's dead end ends no other of its batch, and a grammar llama.cpp
refuses is not printed whole to stderr."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from cli_runner import wait_until_healthy
from serving_helpers import free_port

from edgepack.core.errors import EdgepackError, OutputConstraintError
from edgepack.serve.structured import json_grammar
from runtimes.base import GenerationOptions, LoadOptions

CONTEXT = 1024  # the tools model's prompt holds the tools' JSON
ASK = [{"role": "user", "content": "Answer."}]
NUL_PATTERN = {"type": "string", "pattern": "^\\u0000\\u0000$"}  # no token of the vocabulary spells a NUL
NUL_GRAMMAR = 'root ::= "\\"" "\\u0000\\u0000" "\\""\n'  # what the converter writes for it
LEFT_RECURSIVE = {"$ref": "#/$defs/a", "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "string"}]}}}


class Served:
    def __init__(self, engine: str, url: str, process: subprocess.Popen, log: Path) -> None:
        self.engine, self.url, self.process, self.log = engine, url, process, log

    def post(self, path: str, body: dict, timeout: float = 60) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=timeout)

    def chat(self, **fields) -> httpx.Response:
        return self.post("/v1/chat/completions", {"model": "m", "messages": ASK, "max_tokens": 8, **fields})

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"the server died: status {self.process.returncode}"
        assert httpx.get(f"{self.url}/health", timeout=10).status_code == 200


@pytest.fixture(scope="module", params=["llamacpp", "onnxrt"])
def served(request, tmp_path_factory):
    """`edgepack serve` on the tiny model with a template that takes tools, two sequences at once."""
    model = request.getfixturevalue("tiny_tools_gguf" if request.param == "llamacpp" else "tiny_tools_onnx")
    port, log = free_port(), tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "edgepack", "serve", str(model), "--port", str(port),
                                    "--parallel", "2", "--context", str(CONTEXT), "--threads", "2"],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    server = Served(request.param, f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_healthy(server.url, process, timeout=120)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def error_of(answer: httpx.Response) -> dict:
    return answer.json()["error"]


# -- finding 1: a schema that overflowed llama.cpp's parser ---------------------------------------------------

def test_a_string_of_30000_characters_at_most_is_answered_and_the_server_lives(served):
    answer = served.chat(response_format=schema_format({"type": "string", "maxLength": 30_000}), temperature=0)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"].startswith('"')
    served.assert_alive()
    answer = served.chat(response_format=schema_format({"type": "string", "pattern": "^a{0,1500}$"}))
    assert answer.status_code == 400 and error_of(answer)["param"] == "response_format"
    assert error_of(answer)["message"].startswith("response_format.json_schema.schema.pattern: {0,1500}: at most 500")
    served.assert_alive()


def test_long_strings_through_ollama_and_a_required_tool_call_are_answered(served):
    answer = served.post("/api/chat", {"model": "m", "messages": ASK, "stream": False, "options": {"num_predict": 8},
                                       "format": {"type": "string", "maxLength": 30_000}})
    assert answer.status_code == 200, answer.text
    served.assert_alive()
    tool = {"type": "function", "function": {"name": "note", "parameters": {
        "type": "object", "properties": {"text": {"type": "string", "maxLength": 30_000}}, "required": ["text"]}}}
    answer = served.chat(tools=[tool], tool_choice="required", max_tokens=30)
    assert answer.status_code == 200, answer.text
    served.assert_alive()


# -- finding 2: a grammar that no token can continue -----------------------------------------------------------

def test_a_grammar_no_token_can_continue_is_a_400_and_the_server_lives(served):
    answer = served.chat(response_format=schema_format(NUL_PATTERN), temperature=0)
    assert answer.status_code == 400, answer.text
    assert error_of(answer)["code"] == "unsatisfiable_output_constraint"
    served.assert_alive()
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": ASK, "max_tokens": 8, "temperature": 0, "stream": True,
            "response_format": schema_format(NUL_PATTERN)}) as streamed:
        body = streamed.read().decode()
    assert streamed.status_code in (200, 400) and "unsatisfiable_output_constraint" in body, body
    served.assert_alive()
    answer = served.chat(response_format=schema_format({"enum": ["ok"]}), temperature=0)  # the engine goes on
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == '"ok"'


# -- finding 3: a minimum that would build a gigabyte of grammar -----------------------------------------------

def test_a_minimum_no_context_can_hold_is_refused_at_once_without_memory(served):
    process = psutil.Process(served.process.pid)
    before = process.memory_info().rss
    started = time.monotonic()
    answer = served.chat(response_format=schema_format({"type": "string", "minLength": 30_000_000}))
    took = time.monotonic() - started
    grown = process.memory_info().rss - before
    assert answer.status_code == 400 and error_of(answer)["param"] == "response_format"
    assert error_of(answer)["message"] == ("response_format.json_schema.schema.minLength: 30000000 cannot fit in "
                                           f"the model's context of {CONTEXT} tokens")
    assert grown < 50 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB"
    assert took < 2, f"{took:.2f} s"
    served.assert_alive()


# -- finding 9: client mistakes are 400s that name the part, and the log stays small ----------------------------

MISTAKES = [
    ({"type": "bogus"}, ".type: unknown type 'bogus'"),
    ({"$ref": "#/$defs/nope", "$defs": {"x": {"description": "SECRET"}}}, ".$ref: '#/$defs/nope' points at nothing"),
    ({"enum": []}, ".enum: must be a non-empty list"),
    ({"anyOf": []}, ".anyOf: must be a non-empty list of schemas"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}, ".$ref: $ref cycle"),
    (LEFT_RECURSIVE, ": llama.cpp refused the output grammar: a rule can start with itself (left recursion)"),
    # the converter's assertion quoted all 600 KB of this (unbalanced) pattern in the 500 and the log
    ({"type": "string", "pattern": "^" + "SECRET" * 100_000 + ")$"}, ".pattern: 600003 characters; at most 1000"),
    ({"enum": ["SECRET" * 2000 + str(i) for i in range(90)]}, ": the schema makes a grammar larger than"),  # ~1 MB
]


@pytest.mark.parametrize(("schema", "problem"), MISTAKES)
def test_a_schema_mistake_is_a_400_naming_the_part(served, schema, problem):
    log_before = served.log.stat().st_size
    answer = served.chat(response_format=schema_format(schema))
    assert answer.status_code == 400, answer.text[:500]
    assert "SECRET" not in answer.text and len(answer.content) < 1000, answer.text[:500]
    error = error_of(answer)
    assert error["param"] == "response_format"
    if problem.startswith(": llama.cpp"):
        assert error["message"] == "llama.cpp refused the output grammar: a rule can start with itself (left " \
                                   "recursion)"
    else:
        assert error["message"].startswith("response_format.json_schema.schema" + problem), error["message"]
    assert served.log.stat().st_size - log_before < 4096  # neither the schema nor its grammar went to the log
    served.assert_alive()


def test_a_tool_schema_mistake_is_a_400_naming_the_tool(served):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "bogus"}, "b": {"type": "string", "pattern": "^a{0,1500}$"}}}}}
    answer = served.chat(tools=[tool], tool_choice="required")
    assert answer.status_code == 400, answer.text
    assert error_of(answer)["param"] == "tools"
    assert error_of(answer)["message"].startswith("tools[0].function.parameters.properties.a.type: unknown type")
    served.assert_alive()


# -- the engines: one sequence's dead end, and llama.cpp's parse errors ------------------------------------------

@pytest.fixture(params=["llamacpp", "onnxrt"])
def runtime(request):
    from runtimes.registry import open_runtime

    path = request.getfixturevalue("tiny_gguf" if request.param == "llamacpp" else "tiny_onnx")
    opened = open_runtime(path, LoadOptions(context_length=512, parallel=2, threads=2))
    yield opened
    opened.close()


def test_one_sequences_dead_end_ends_no_other_of_its_batch(runtime):
    prompt = runtime.tokenize("Once upon a time")
    eos = tuple((token, -100.0) for token in runtime.eos_token_ids)
    results: dict[str, object] = {}

    def run(name: str, options: GenerationOptions) -> None:
        try:
            results[name] = runtime.complete(prompt, options)
        except Exception as exc:  # noqa: BLE001 (what the test looks at)
            results[name] = exc

    free = threading.Thread(target=run, args=("free", GenerationOptions(max_tokens=300, logit_bias=eos)))
    free.start()
    time.sleep(0.05)  # the free one is running when the other starts
    for attempt in range(3):  # each ends at its first token; the free one runs on through all of them
        run(f"dead{attempt}", GenerationOptions(max_tokens=20, grammar=NUL_GRAMMAR))
    free.join(timeout=120)
    assert all(isinstance(results[f"dead{i}"], OutputConstraintError) for i in range(3)), results
    assert results["free"].finish_reason == "length" and results["free"].completion_tokens == 300
    after = runtime.complete(prompt, GenerationOptions(max_tokens=5, logit_bias=eos))  # the scheduler still runs
    assert after.completion_tokens == 5


def test_a_grammar_llama_cpp_refuses_is_a_short_error_not_printed_whole(runtime, capfd):
    grammar = 'root ::= "a" (\n' + "".join(f'rule{i} ::= "SECRET{i}"\n' for i in range(20_000))
    with pytest.raises(EdgepackError) as info:
        runtime.check_output_grammar(grammar)
    assert str(info.value).startswith("llama.cpp refused the output grammar: ") and len(str(info.value)) < 300
    printed = capfd.readouterr().err  # llama.cpp's reason, which quotes a line of the grammar at most
    assert printed.count("SECRET") <= 1 and len(printed) < 1000, printed[:2000]
    runtime.check_output_grammar(json_grammar({"type": "string", "maxLength": 30_000}, 512))
