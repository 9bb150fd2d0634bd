"""`edgepack.load(BUNDLE)`: a model in this process, for a desktop app that embeds it without a second process.

`chat(messages)` and `complete(prompt)` (both can stream) and `serve(port=...)` over the OpenAI API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.serve.app import ServerConfig, run_server, start_server_thread
from edgepack.serve.session import ModelSession, defaults_for, open_session
from runtimes.base import Device, GenerationOptions


class LocalModel(ModelSession):
    """A ModelSession with the calls an application makes: chat, complete, serve."""

    def _run(self, prompt_ids: list[int], stream: bool, options: GenerationOptions) -> Any:
        if stream:
            return (chunk.text for chunk in self.stream_ids(prompt_ids, options) if chunk.text)
        self.runtime.check_prompt_fits(prompt_ids, 1)
        if self.runtime.generates_concurrently:
            return self.runtime.complete(prompt_ids, options)
        with self._lock:
            return self.runtime.complete(prompt_ids, options)

    def chat(self, messages: list[dict[str, str]], stream: bool = False, **generation: Any) -> Any:
        """The assistant's reply: a GenerationResult, or an iterator of text pieces with stream=True."""
        return self._run(self.prompt_ids(messages=messages), stream, GenerationOptions(**_options(generation)))

    def complete(self, prompt: str, stream: bool = False, **generation: Any) -> Any:
        return self._run(self.prompt_ids(prompt=prompt), stream, GenerationOptions(**_options(generation)))

    def serve(self, host: str = "127.0.0.1", port: int = 8080, in_thread: bool = True, **server_options: Any):
        """Serve this model over the OpenAI API; in_thread=True returns a handle with .url and .stop()."""
        config = ServerConfig(host=host, port=port, **server_options)
        if in_thread:
            return start_server_thread(self, config)
        run_server(self, config)
        return None


def _options(generation: dict[str, Any]) -> dict[str, Any]:
    if "stop" in generation and isinstance(generation["stop"], str):
        generation = {**generation, "stop": (generation["stop"],)}
    elif "stop" in generation:
        generation = {**generation, "stop": tuple(generation["stop"] or ())}
    return generation


def load(path: str | Path, threads: int | None = None, context: int | None = None,
         device: Device | None = None, parallel: int | None = None) -> LocalModel:
    """Load a bundle (verified) or a variant for chat/complete/serve in this process. `parallel`: generations at
    once on llama.cpp (default DEFAULT_PARALLEL), each with `context` tokens of KV cache."""
    return open_session(defaults_for(Path(path)), threads, context, device, cls=LocalModel,  # type: ignore[return-value]
                        parallel=parallel)


