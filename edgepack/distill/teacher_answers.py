"""Sequence-level distillation's data: the teacher's answers to prompts, cached.

The teacher is a Hugging Face model (transformers' generate) or an OpenAI-compatible endpoint (a cloud model, or
`edgepack serve` of a bigger local model; the key, if any, from an environment variable, never the command line;
asked through teacher_endpoint.py).
Each prompt is answered `samples` times, greedily at temperature 0, else sampled with a seed. From an endpoint that
returns log-probabilities, each answer token's log-probability (and the alternatives', with `top_logprobs`) comes
back too; when those tokens map one to one onto the student's vocabulary they become sparse soft targets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edgepack.core.cache import cache_root
from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import atomic_output_file
from edgepack.distill.teacher_endpoint import Endpoint, TeacherStatusError

CACHE_FORMAT = 1
ENDPOINT_TOP_LOGPROBS = 20  # the most OpenAI's API returns per token


@dataclass(frozen=True)
class TeacherAnswer:
    prompt_index: int
    sample: int
    text: str
    # per answer token, (token text, [(alternative text, logprob), ...] most likely first), when the teacher gave them
    token_logprobs: list[tuple[str, list[tuple[str, float]]]] | None = None


@dataclass(frozen=True)
class AnswerSettings:
    samples: int = 1
    temperature: float = 0.0
    max_tokens: int = 256
    seed: int = 0


def answers_cache_path(teacher_identity: str, prompts: list[tuple[dict, ...]], settings: AnswerSettings) -> Path:
    key = json.dumps([CACHE_FORMAT, teacher_identity, [list(p) for p in prompts], asdict(settings)], sort_keys=True)
    return cache_root() / "distill-answers" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def cached_answers(path: Path, make: Callable[[], list[TeacherAnswer]]) -> tuple[list[TeacherAnswer], bool]:
    """The answers from the cache, or made and cached; and whether the cache had them."""
    if path.is_file():
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [TeacherAnswer(r["prompt_index"], r["sample"], r["text"],
                              [(t, [tuple(a) for a in alts]) for t, alts in r["token_logprobs"]]
                              if r.get("token_logprobs") is not None else None) for r in rows], True
    answers = make()
    with atomic_output_file(path) as tmp:
        tmp.write_text(json.dumps([asdict(a) for a in answers]), encoding="utf-8")
    return answers, False


def hf_answers(runtime, prompts: list[tuple[dict, ...]], settings: AnswerSettings,
               on_prompt: Callable[[], None] | None = None) -> list[TeacherAnswer]:
    """The teacher's answers through transformers (`runtime` is the teacher's TorchRuntime): greedy answers in
    left-padded batches, sampled ones one prompt at a time with `samples` sequences each."""
    import torch
    from transformers import GenerationConfig

    tokenizer = runtime.tokenizer
    if not tokenizer.chat_template:
        raise EdgepackError("the teacher has no chat template, so it cannot answer chat prompts; give --data text "
                            "for --mode logits instead")
    prompt_ids = [runtime.chat_prompt_ids(list(messages)) for messages in prompts]
    answers = []
    if settings.temperature <= 0:  # greedy answers are all the same: made once, used `samples` times
        for start in range(0, len(prompts), 16):
            group = prompt_ids[start:start + 16]
            for offset, ids in enumerate(runtime.greedy_batch(group, settings.max_tokens)):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                answers += [TeacherAnswer(start + offset, sample, text) for sample in range(settings.samples)]
                if on_prompt is not None:
                    on_prompt()
        return answers
    eos = sorted(runtime.eos_token_ids)
    config = GenerationConfig(max_new_tokens=settings.max_tokens, do_sample=True, temperature=settings.temperature,
                              top_p=None, top_k=None, num_return_sequences=settings.samples, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    for index, ids in enumerate(prompt_ids):
        tensor = torch.tensor([ids], device=runtime.device)
        torch.manual_seed(settings.seed + index)
        with torch.inference_mode():
            made = runtime.model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor),
                                          generation_config=config)
        for sample in range(made.shape[0]):
            answers.append(TeacherAnswer(index, sample, tokenizer.decode(made[sample, len(ids):],
                                                                         skip_special_tokens=True)))
        if on_prompt is not None:
            on_prompt()
    return answers


def endpoint_answers(endpoint: Endpoint, prompts: list[tuple[dict, ...]], settings: AnswerSettings,
                     on_prompt: Callable[[], None] | None = None) -> list[TeacherAnswer]:
    answers = []
    with endpoint.client() as client:
        for index, messages in enumerate(prompts):
            for sample in range(settings.samples):
                try:
                    text, token_logprobs = _ask(endpoint, client, list(messages), settings, sample + settings.seed)
                except EdgepackError as exc:
                    raise EdgepackError(f"{exc} (prompt {index + 1})") from None
                answers.append(TeacherAnswer(index, sample, text, token_logprobs))
            if on_prompt is not None:
                on_prompt()
    return answers


def _ask(endpoint: Endpoint, client, messages: list[dict], settings: AnswerSettings, seed: int):
    payload = {"model": endpoint.model, "messages": messages, "max_tokens": settings.max_tokens,
               "temperature": settings.temperature, "seed": seed, "logprobs": True}
    try:
        return endpoint.chat(client, {**payload, "top_logprobs": ENDPOINT_TOP_LOGPROBS})
    except TeacherStatusError as exc:
        if exc.status != 400:
            raise
    # an endpoint that gives no alternatives still gives the chosen tokens'
    return endpoint.chat(client, payload)
