"""The teacher's soft targets for logit distillation, computed once and cached on disk.

The teacher (a Hugging Face model in transformers) reads every training sequence once. At each scored position the
cache keeps its top-k log-probabilities (ids and values) and the log of the mass outside them: K · 6 + 4 bytes a
position instead of the whole vocabulary. Shards of SHARD_SEQUENCES sequences are written as compressed .npz as they
are made, so a killed teacher pass resumes at the first missing shard; the entry is complete once `complete.json`
is written. The key covers the teacher's weights, the token sequences (hence the data and the tokenizer) and k, so
several students, or a resumed run, reuse it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgepack.core.cache import cache_root
from edgepack.core.fileio import atomic_output_file
from edgepack.distill.data import TrainingSequence, sequences_digest

CACHE_FORMAT = 1
SHARD_SEQUENCES = 32
REST_LOGMASS_FLOOR = -30.0  # e^-30: a reverse KL must not see a teacher class of exactly zero mass


@dataclass(frozen=True)
class SparseTargets:
    """The teacher's targets at one sequence's scored positions, in position order."""

    top_ids: np.ndarray  # [S, K] int32
    top_logprobs: np.ndarray  # [S, K] float16
    rest_logmass: np.ndarray  # [S] float32


@dataclass(frozen=True)
class TargetsCacheEntry:
    path: Path
    hit: bool  # every shard was on disk before this run


def cache_dir(teacher_fingerprint: str, sequences: list[TrainingSequence], top_k: int) -> Path:
    key = json.dumps([CACHE_FORMAT, teacher_fingerprint, sequences_digest(sequences), top_k])
    return cache_root() / "distill-teacher" / hashlib.sha256(key.encode()).hexdigest()[:32]


def sparse_from_logits(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, V] logits -> top-k ids [N, K], their log-probabilities [N, K], log of the rest's mass [N]."""
    logits = logits.float()
    total = torch.logsumexp(logits, dim=-1, keepdim=True)
    values, ids = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
    rest = torch.logsumexp(logits.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True) - total
    return ids, values - total, rest.squeeze(-1).clamp(min=REST_LOGMASS_FLOOR)


@torch.inference_mode()
def teacher_targets(model, sequences: list[TrainingSequence], top_k: int, directory: Path, batch_size: int,
                    device: str, on_sequences: Callable[[int], None] | None = None) -> TargetsCacheEntry:
    """Fill `directory` with the teacher's targets for `sequences` (missing shards only)."""
    directory.mkdir(parents=True, exist_ok=True)
    complete = directory / "complete.json"
    if complete.is_file():
        return TargetsCacheEntry(directory, hit=True)
    for shard, start in enumerate(range(0, len(sequences), SHARD_SEQUENCES)):
        path = directory / f"shard-{shard:05d}.npz"
        group = sequences[start:start + SHARD_SEQUENCES]
        if path.is_file():
            if on_sequences is not None:
                on_sequences(len(group))
            continue
        found = []
        for batch_start in range(0, len(group), batch_size):
            batch = group[batch_start:batch_start + batch_size]
            found.extend(_targets_for_batch(model, batch, top_k, device))
            if on_sequences is not None:
                on_sequences(len(batch))
        _write_shard(path, found)
    with atomic_output_file(complete) as tmp:
        tmp.write_text(json.dumps({"sequences": len(sequences), "top_k": top_k}))
    return TargetsCacheEntry(directory, hit=False)


def _targets_for_batch(model, batch: list[TrainingSequence], top_k: int, device: str) -> list[SparseTargets]:
    width = max(len(s.input_ids) for s in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, sequence in enumerate(batch):
        ids[row, :len(sequence.input_ids)] = torch.tensor(sequence.input_ids)
        mask[row, :len(sequence.input_ids)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    found = []
    for row, sequence in enumerate(batch):
        scored = torch.tensor(sequence.scored, dtype=torch.bool, device=logits.device)
        top_ids, top_logprobs, rest = sparse_from_logits(logits[row, :len(sequence.scored)][scored], top_k)
        found.append(SparseTargets(top_ids.to(torch.int32).cpu().numpy(),
                                   top_logprobs.to(torch.float16).cpu().numpy(), rest.cpu().numpy()))
    return found


def _write_shard(path: Path, targets: list[SparseTargets]) -> None:
    lengths = np.asarray([len(t.rest_logmass) for t in targets], dtype=np.int64)
    arrays = {"lengths": lengths,
              "top_ids": np.concatenate([t.top_ids for t in targets]),
              "top_logprobs": np.concatenate([t.top_logprobs for t in targets]),
              "rest_logmass": np.concatenate([t.rest_logmass for t in targets])}
    with atomic_output_file(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def load_targets(directory: Path) -> list[SparseTargets]:
    """Every sequence's targets, in sequence order, from a complete cache entry."""
    found = []
    for path in sorted(directory.glob("shard-*.npz")):
        with np.load(path) as data:
            offsets = np.concatenate([[0], np.cumsum(data["lengths"])])
            top_ids, top_logprobs, rest = data["top_ids"], data["top_logprobs"], data["rest_logmass"]
            for a, b in zip(offsets[:-1], offsets[1:], strict=True):
                found.append(SparseTargets(top_ids[a:b], top_logprobs[a:b], rest[a:b]))
    return found
