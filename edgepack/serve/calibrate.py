"""`edgepack route calibrate`: the confidence threshold that keeps a chosen share of requests local.

The local model answers every prompt of a JSONL file greedily; each answer's mean token log-probability is its
confidence. The threshold sits between the answers that stay local (the most confident `local_share` of them)
and the rest, and is written to the router config the server reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import read_jsonl
from edgepack.serve.router import RouterConfig, confidence_of
from edgepack.serve.session import ModelSession
from runtimes.base import GenerationOptions


@dataclass(frozen=True)
class Calibration:
    threshold: float
    local_share_target: float
    local_share: float  # what the threshold gives on these prompts
    prompts: int
    scores: tuple[float, ...]


def load_prompts(path: Path) -> list[dict]:
    prompts = []
    for number, item in read_jsonl(path, "prompts file"):
        if not isinstance(item, dict) or not (isinstance(item.get("prompt"), str) or
                                              isinstance(item.get("messages"), list)):
            raise EdgepackError(f"{path}:{number}: each line must be {{\"prompt\": TEXT}} or "
                                "{\"messages\": [{\"role\", \"content\"}, ...]}")
        prompts.append(item)
    if len(prompts) < 2:
        raise EdgepackError(f"{path}: at least 2 prompts are needed to calibrate a threshold")
    return prompts


def calibrate(model: ModelSession, prompts: list[dict], local_share: float, max_tokens: int = 64) -> Calibration:
    if not 0 < local_share <= 1:
        raise EdgepackError(f"--local-share must be in (0, 1], got {local_share}")
    scores = []
    options = GenerationOptions(max_tokens=max_tokens, temperature=0.0, logprobs=True)
    for item in prompts:
        ids = model.prompt_ids(messages=item["messages"]) if "messages" in item else model.prompt_ids(item["prompt"])
        ids = ids[-(model.context_length - max_tokens):]
        result = model.runtime.complete(ids, options)
        confidence = confidence_of(list(result.logprobs or ()))
        scores.append(confidence.mean_logprob if confidence else 0.0)
    ranked = sorted(scores, reverse=True)
    keep = math.ceil(local_share * len(ranked))
    if keep >= len(ranked):
        threshold = ranked[-1] - 1e-6
    else:
        threshold = (ranked[keep - 1] + ranked[keep]) / 2
    share = sum(score >= threshold for score in scores) / len(scores)
    return Calibration(threshold=threshold, local_share_target=local_share, local_share=share, prompts=len(scores),
                       scores=tuple(scores))


def write_threshold(config_path: Path, calibration: Calibration) -> RouterConfig:
    """Keep what the config file says and set the threshold (a new file routes `auto`)."""
    config_path = Path(config_path)
    config = RouterConfig.from_file(config_path) if config_path.is_file() else RouterConfig(policy="auto")
    config = replace(config, min_mean_logprob=round(calibration.threshold, 6))
    config.to_file(config_path)
    return config


def calibrate_file(prompts_file: Path, model_path: Path, local_share: float, config_path: Path,
                   max_tokens: int = 64) -> Calibration:
    """`edgepack route calibrate`: load the model, find the threshold, write it to the router config."""
    from edgepack.serve.model import load

    prompts = load_prompts(prompts_file)
    model = load(model_path)
    try:
        calibration = calibrate(model, prompts, local_share, max_tokens)
    finally:
        model.close()
    write_threshold(config_path, calibration)
    return calibration
