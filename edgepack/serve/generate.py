"""Generate from any variant: the engine is chosen from what the path is (see runtimes.registry)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepack.core.errors import EdgepackError
from runtimes.base import GenerationOptions, LoadOptions
from runtimes.registry import open_runtime


@dataclass(frozen=True)
class RunReport:
    engine: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


def run_prompt(path: Path, prompt: str, *, chat: bool, system: str | None, generation: GenerationOptions,
               load: LoadOptions, engine: str | None = None, on_text: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None) -> RunReport:
    if generation.max_tokens < 1:
        raise EdgepackError(f"--max-tokens {generation.max_tokens}: must be at least 1")
    runtime = open_runtime(path, load, engine)
    try:
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            prompt_ids = runtime.chat_prompt_ids(messages)
        else:
            prompt_ids = runtime.tokenize(prompt)
        runtime.check_prompt_fits(prompt_ids, generation.max_tokens)
        started = time.perf_counter()
        pieces, made, reason = [], 0, "length"
        try:
            for chunk in runtime.generate(prompt_ids, generation, cancel):
                if chunk.text:
                    pieces.append(chunk.text)
                    if on_text is not None:
                        on_text(chunk.text)
                made += chunk.token_id is not None and chunk.token_id not in runtime.eos_token_ids
                reason = chunk.finish_reason or reason
        except ValueError as exc:  # sampler settings out of range
            raise EdgepackError(str(exc)) from exc
        return RunReport(engine=runtime.name, text="".join(pieces), finish_reason=reason,
                         prompt_tokens=len(prompt_ids), completion_tokens=made,
                         seconds=time.perf_counter() - started)
    finally:
        runtime.close()

