"""From an OpenAI request to a generation plan, and from generated chunks to OpenAI's response and stream shapes."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Literal

from edgepack.core.errors import ApiError, EdgepackError
from edgepack.serve.prompt_prep import prompt_ids_for
from edgepack.serve.protocol import ChatRequest, CompletionRequest
from edgepack.serve.session import ModelSession
from edgepack.serve.structured import response_format_grammar
from edgepack.serve.tools import (
    StreamEvent,
    ToolCallStream,
    ToolFormat,
    parse_tool_calls,
    tool_call_grammar,
    tool_format,
)
from runtimes.base import GenerationChunk, GenerationOptions

PlanKind = Literal["chat", "completion"]


@dataclass
class GenerationPlan:
    """A validated request, ready for the engine."""

    prompt_ids: list[int]
    options: GenerationOptions
    kind: PlanKind
    include_usage: bool
    tool_format: ToolFormat | None = None  # the answer may hold tool calls written this way
    choices: int = 1  # n: answers made side by side

    def per_choice(self) -> list[GenerationPlan]:
        """One plan for each choice; with a seed, choice i draws with seed + i (different answers, reproducible)."""
        if self.choices == 1:
            return [self]
        seed = self.options.seed
        return [replace(self, options=replace(self.options, seed=None if seed is None else seed + i), choices=1)
                for i in range(self.choices)]


def plan_request(model: ModelSession, request: ChatRequest | CompletionRequest,
                 cancel: threading.Event | None = None) -> GenerationPlan:
    """Check a request against what this server and model can do; the prompt's tokens and generation options.
    Runs on a worker thread; `cancel` (a client that went away) stops it while it tokenizes (PromptCancelled)."""
    problem = request.unsupported()
    if problem is not None:
        raise ApiError(400, f"unsupported value: {problem}", param=problem.split(":")[0])
    tools = request.tools_offered() if isinstance(request, ChatRequest) else None
    fmt, grammar = _output_shape(model, request, tools)
    logit_bias = _logit_bias(model, request)
    prompt_ids = prompt_ids_for(model, request, tools, cancel)
    chat = isinstance(request, ChatRequest)
    kind: PlanKind = "chat" if chat else "completion"
    logprobs = request.logprobs if chat else request.logprobs is not None
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty after tokenization; give at least one token",
                       param="messages" if kind == "chat" else "prompt")
    limit = request.limit()
    context = model.context_length
    if len(prompt_ids) + (limit or 1) > context:
        asked = f" plus max_tokens {limit}" if limit else ""
        raise ApiError(400, f"This model's maximum context length is {context} tokens; the request has "
                            f"{len(prompt_ids)} prompt tokens{asked}. Shorten the prompt or lower max_tokens.",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    options = GenerationOptions(max_tokens=limit or context - len(prompt_ids), temperature=request.temperature,
                                top_p=request.top_p, top_k=request.top_k, seed=request.seed_value(),
                                stop=request.stops(),
                                logprobs=logprobs, top_logprobs=request.top_logprob_count(), logit_bias=logit_bias,
                                presence_penalty=request.presence_penalty,
                                frequency_penalty=request.frequency_penalty, grammar=grammar)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return GenerationPlan(prompt_ids, options, kind, include_usage, fmt, request.n)


def _output_shape(model: ModelSession, request: ChatRequest | CompletionRequest,
                  tools: list[dict[str, Any]] | None) -> tuple[ToolFormat | None, str | None]:
    """How the model writes tool calls (None without tools), and the grammar its answer must follow (None: free):
    the response_format's, or a required tool call's, bounded for the model's context (schema_bounds) and compiled
    once here, on the planning thread, so that what llama.cpp refuses is a 400 before the request is admitted."""
    shaped = request.response_format is not None and request.response_format.type != "text"
    if shaped:
        _refuse_unless_constrained(model, "response_format")
    try:
        grammar = response_format_grammar(request.response_format, model.context_length)
    except EdgepackError as exc:
        raise ApiError(400, str(exc), param="response_format") from None
    fmt, tool_grammar = _tool_shape(model, request, tools) if tools else (None, None)
    if tool_grammar is not None and grammar is not None:
        raise ApiError(400, "response_format and a required tool call cannot both shape the answer; drop one",
                       param="response_format")
    grammar = grammar or tool_grammar
    if grammar is not None:
        try:
            model.runtime.check_output_grammar(grammar)
        except EdgepackError as exc:
            raise ApiError(400, str(exc), param="response_format" if shaped else "tools") from None
    return fmt, grammar


def _tool_shape(model: ModelSession, request: ChatRequest | CompletionRequest,
                tools: list[dict[str, Any]]) -> tuple[ToolFormat, str | None]:
    """The tool-call format of the model's template, and the grammar of a call when tool_choice requires one."""
    assert isinstance(request, ChatRequest)
    choice = _choice(request.tool_choice)
    try:
        fmt = tool_format(model.chat_template_text())
        if choice not in (None, "auto", "none"):
            _refuse_unless_constrained(model, "tool_choice")
        return fmt, tool_call_grammar(tools, choice, fmt, parallel=request.parallel_tool_calls is not False,
                                      context_length=model.context_length)
    except ApiError:
        raise
    except EdgepackError as exc:
        raise ApiError(400, str(exc), param="tools" if "tool_choice" not in str(exc) else "tool_choice") from None


def _refuse_unless_constrained(model: ModelSession, param: str) -> None:
    runtime = model.runtime
    if not runtime.constrains_output:
        raise ApiError(400, f"the {runtime.name} engine cannot constrain its output (response_format, a required "
                            f"tool call) here; {runtime.unconstrained_remedy}", param=param)


def _logit_bias(model: ModelSession, request: ChatRequest | CompletionRequest) -> tuple[tuple[int, float], ...]:
    try:
        logit_bias = request.logit_biases()
    except ValueError as exc:
        raise ApiError(400, str(exc), param="logit_bias") from exc
    vocab = model.runtime.vocab_size()
    beyond = [token for token, _ in logit_bias if vocab is not None and token >= vocab]
    if beyond:
        raise ApiError(400, f"logit_bias: token {beyond[0]} is not in the vocabulary (ids 0 to {vocab - 1})",
                       param="logit_bias")
    return logit_bias


def _choice(tool_choice: Any) -> Any:
    """tool_choice as tools.tool_call_grammar takes it: a string, or {"function": {"name": ...}}."""
    return tool_choice.model_dump() if hasattr(tool_choice, "model_dump") else tool_choice


def _token_entry(model: ModelSession, token_id: int, logprob: float) -> dict[str, Any]:
    raw = model.runtime.token_bytes(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def logprob_entry(model: ModelSession, chunk: GenerationChunk) -> dict[str, Any]:
    """A chat logprobs entry: the token, its raw bytes, and the most likely alternatives when asked for."""
    return {**_token_entry(model, chunk.token_id, chunk.logprob),
            "top_logprobs": [_token_entry(model, token, logprob) for token, logprob in chunk.top_logprobs]}


def visible(model: ModelSession, chunk: GenerationChunk) -> bool:
    """A generated token the client sees (an end-of-generation token is not one)."""
    return chunk.token_id is not None and not (chunk.finish_reason and chunk.token_id in model.runtime.eos_token_ids)


def usage(plan: GenerationPlan, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": len(plan.prompt_ids), "completion_tokens": completion_tokens,
            "total_tokens": len(plan.prompt_ids) + completion_tokens}


def whole_response(model: ModelSession, plan: GenerationPlan, ident: str,
                   answers: list[list[GenerationChunk]]) -> dict[str, Any]:
    """The response for the chunks of each choice."""
    choices = [_whole_choice(model, plan, index, chunks) for index, chunks in enumerate(answers)]
    made = sum(visible(model, c) for chunks in answers for c in chunks)
    return {"id": ident, "created": int(time.time()), "model": model.model_id, "usage": usage(plan, made),
            "object": "chat.completion" if plan.kind == "chat" else "text_completion", "choices": choices}


def _whole_choice(model: ModelSession, plan: GenerationPlan, index: int,
                  chunks: list[GenerationChunk]) -> dict[str, Any]:
    text = "".join(c.text for c in chunks)
    shown = [c for c in chunks if visible(model, c)]
    finish = next((c.finish_reason for c in reversed(chunks) if c.finish_reason), "length")
    if plan.kind == "chat":
        logprobs = {"content": [logprob_entry(model, c) for c in shown
                                if c.logprob is not None]} if plan.options.logprobs else None
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if plan.tool_format is not None:
            parsed = parse_tool_calls(text, plan.tool_format)
            if parsed.tool_calls:
                message = {"role": "assistant", "content": parsed.content or None,
                           "tool_calls": [call.as_openai() for call in parsed.tool_calls]}
                finish = "tool_calls" if finish == "stop" else finish
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
    logprobs = None
    if plan.options.logprobs:
        tokens = [model.runtime.detokenize([c.token_id]) for c in shown]
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        top = [{model.runtime.detokenize([t]): lp for t, lp in c.top_logprobs} for c in shown] \
            if plan.options.top_logprobs else None
        logprobs = {"tokens": tokens, "token_logprobs": [c.logprob for c in shown], "top_logprobs": top,
                    "text_offset": offsets}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class StreamEvents:
    """The server-sent events of one streamed answer, chat or completion."""

    def __init__(self, model: ModelSession, plan: GenerationPlan, ident: str, index: int = 0) -> None:
        self.model, self.plan, self.ident, self.index = model, plan, ident, index
        self.chat = plan.kind == "chat"
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.created = int(time.time())
        self.tool_calls = ToolCallStream(plan.tool_format) if plan.tool_format is not None else None
        self.calls_made = 0
        self.text_offset = 0  # completions: where the next token starts in the answer's text

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({"id": self.ident, "object": self.object, "created": self.created, "model": self.model.model_id,
                    "choices": choices, **extra})

    def _choice(self, text: str | None, finish: str | None, logprob: dict[str, Any] | None = None,
                role: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": self.index, "text": text or "", "logprobs": logprob, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": self.index, "delta": delta, "logprobs": {"content": [logprob]} if logprob else None,
                "finish_reason": finish}

    def role(self) -> bytes:
        return self._event([self._choice(None, None, role=True)])

    def piece(self, chunk: GenerationChunk) -> bytes | None:
        """The events for one generated chunk, or None when it adds nothing the client sees."""
        shown = visible(self.model, chunk)
        logprob = None
        if shown and chunk.logprob is not None and self.plan.options.logprobs:
            logprob = logprob_entry(self.model, chunk) if self.chat else self._completion_logprobs(chunk)
        if self.tool_calls is not None:
            events = self._tool_events(self.tool_calls.feed(chunk.text))
            if logprob is not None:
                events += self._event([self._choice(None, None, logprob)])
            return events or None
        if not chunk.text and logprob is None:
            return None
        return self._event([self._choice(chunk.text, None, logprob)])

    def _completion_logprobs(self, chunk: GenerationChunk) -> dict[str, Any]:
        """The completions API's logprobs for one token, as the whole answer's are (one entry a list)."""
        token = self.model.runtime.detokenize([chunk.token_id])
        top = [{self.model.runtime.detokenize([t]): lp for t, lp in chunk.top_logprobs}] \
            if self.plan.options.top_logprobs else None
        entry = {"tokens": [token], "token_logprobs": [chunk.logprob], "top_logprobs": top,
                 "text_offset": [self.text_offset]}
        self.text_offset += len(token)
        return entry

    def _tool_events(self, events: list[StreamEvent]) -> bytes:
        """Content deltas, and each tool call as one delta with its id, name and whole arguments."""
        out = b""
        for event in events:
            if event.call is None:
                out += self._event([self._choice(event.content, None)]) if event.content else b""
                continue
            delta = {"tool_calls": [{"index": self.calls_made, **event.call.as_openai()}]}
            self.calls_made += 1
            out += self._event([{"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None}])
        return out

    def finish(self, reason: str) -> bytes:
        held = self._tool_events(self.tool_calls.finish()) if self.tool_calls is not None else b""
        if self.calls_made and reason == "stop":
            reason = "tool_calls"
        return held + self._event([self._choice(None, reason)])

    def usage(self, completion_tokens: int) -> bytes:
        return self._event([], usage=usage(self.plan, completion_tokens))

    def done(self) -> bytes:
        return sse("[DONE]")
