"""A request's prompt as tokens, in time linear in its length and never more work than the context can use: a
prompt that cannot fit is refused before anything is tokenized where that is plain from its size (more messages
than the context has positions, more characters than the context's positions could spell with the vocabulary's
longest token), and tokenizing stops as soon as the count passes the context, or once the client has gone."""

from __future__ import annotations

import json
import threading
from typing import Any

from edgepack.core.errors import ApiError
from edgepack.serve.protocol import ChatRequest, CompletionRequest
from edgepack.serve.session import ModelSession
from runtimes.prompt_tokens import PromptTooLong


def prompt_ids_for(model: ModelSession, request: ChatRequest | CompletionRequest,
                   tools: list[dict[str, Any]] | None, cancel: threading.Event | None = None) -> list[int]:
    """The prompt's tokens; a 400 (context_length_exceeded) for one that cannot fit. Raises
    runtimes.prompt_tokens.PromptCancelled once `cancel` is set."""
    context = model.context_length
    chat = isinstance(request, ChatRequest)
    param = "messages" if chat else "prompt"
    if chat and len(request.messages) > context:
        raise _too_long(context, f"{len(request.messages)} messages (each takes at least one token)", param)
    characters = _client_characters(request, tools)
    longest = model.runtime.longest_token_chars
    if characters > context * longest:
        raise _too_long(context, f"{characters} characters (a token of this model spells at most {longest})",
                        param)
    try:
        if chat:
            return model.prompt_ids(messages=[m.for_template() for m in request.messages], tools=tools,
                                    limit=context, cancel=cancel)
        return model.prompt_ids(prompt=request.text(), limit=context, cancel=cancel)
    except PromptTooLong as exc:
        raise _too_long(context, f"at least {exc.tokens_at_least} prompt tokens", param) from exc


def _client_characters(request: ChatRequest | CompletionRequest, tools: list[dict[str, Any]] | None) -> int:
    """Characters of what the client wrote into the prompt (the template adds its own)."""
    if isinstance(request, CompletionRequest):
        return len(request.text())
    calls = [call.model_dump() for m in request.messages for call in m.tool_calls or ()]
    return sum(len(m.text()) for m in request.messages) + (len(json.dumps(calls)) if calls else 0) + (
        len(json.dumps(tools)) if tools else 0)


def _too_long(context: int, what: str, param: str) -> ApiError:
    return ApiError(400, f"This model's maximum context length is {context} tokens; the request has {what}. "
                         "Shorten the prompt.", param=param, code="context_length_exceeded")
