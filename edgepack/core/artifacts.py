"""The typed artifacts passed between pipeline stages. Each is frozen and serialises to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# why selection passed over a variant (edgepack/select.py)
RejectionReason = Literal["gate", "does not fit", "slower", "larger", "lower quality", "crashed"]


def to_json_dict(artifact: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass artifact (paths become strings)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(item) for item in value]
        return value

    return convert(dataclasses.asdict(artifact))


@dataclass(frozen=True)
class StudentModel:
    """A Hugging Face model directory, as the converters understand it."""

    path: Path
    architecture: str  # our architecture name, e.g. "llama", "qwen3"
    hf_model_type: str  # config.json's model_type
    parameter_count: int
    context_length: int
    tokenizer_kind: str  # "bpe" (byte-level, GPT-2 style) or "spm" (SentencePiece)
    has_chat_template: bool
    dtype: str  # the dtype the weights are stored in, e.g. "bfloat16"
    origin: str | None = None  # where the weights came from when that qualifies every figure (an imported GGUF)
    distillation: dict | None = None  # the summary of distill.json, for a student made by `edgepack distill`


@dataclass(frozen=True)
class Variant:
    """One converted build of a model: a file (GGUF) or a directory (ONNX) of a given kind."""

    kind: str  # e.g. "gguf-q4_k_m"
    path: Path
    files: tuple[str, ...]  # relative to path's parent for a file, to path for a directory
    bytes: int
    sha256: str
    converter: str  # what made it, e.g. "edgepack 0.1.0 hf->gguf + llama.cpp quantize"
    library_versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AnswerDifference:
    """One prompt whose greedy answer from a variant differs from the reference's."""

    id: str
    prompt: str  # the last user message
    reference: str
    variant: str
    first_divergence: int  # the answer token where the variant's most likely token first differs


@dataclass(frozen=True)
class BehaviourQuality:
    """A variant's answers to the behaviour prompts against the reference's greedy answers."""

    prompts: int
    identical: int  # prompts answered with the reference's text, to the letter
    answer_tokens: int  # reference answer tokens teacher-forced
    answer_kld_mean: float  # KL divergence from the reference per answer token
    answer_kld_ci: tuple[float, float]  # 95% interval (bootstrap over prompts); the gate judges the upper end
    answer_same_top1: float  # share of answer tokens whose most likely token is the reference's
    median_first_divergence: float | None  # answer token where the variant's greedy choice first differs, over
    # the prompts where it does (the text may still come out the same, spelled with other tokens)
    checkable: int  # prompts with an answer to check
    correct: int  # of those, answered right by the variant
    reference_correct: int  # ... and by the reference
    only_reference_correct: int  # McNemar's discordant pairs: the reference right, the variant wrong
    only_variant_correct: int
    mcnemar_p: float  # one-sided exact p of the variant being right less often than the reference
    differences: tuple[AnswerDifference, ...]  # a few, for the report

    @property
    def identical_share(self) -> float:
        return self.identical / self.prompts if self.prompts else 1.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BehaviourQuality:
        return cls(**{**data, "answer_kld_ci": tuple(data["answer_kld_ci"]),
                      "differences": tuple(AnswerDifference(**d) for d in data["differences"])})


@dataclass(frozen=True)
class VariantQuality:
    """One variant measured against the reference logits of the original model."""

    name: str
    path: Path
    engine: str
    perplexity: float
    ppl_ratio: float  # perplexity / the reference's
    kld_mean: float
    kld_p99: float
    same_top1: float  # share of positions whose most likely token is the reference's
    rms_delta_p: float  # RMS of (reference - variant) probability of the actual next token
    task_accuracy: float | None
    passed: bool
    reasons: tuple[str, ...]  # why it failed the gate (empty when it passed)
    seconds: float
    ppl_ratio_ci: tuple[float, float]  # 95% interval (block bootstrap over the scored positions)
    kld_mean_ci: tuple[float, float]  # 95% interval; the gate judges the upper ends of both
    behaviour: BehaviourQuality | None = None  # None: no behaviour prompts (a model without a chat template)
    positions_scored: int = 0  # of the evaluation text: fewer than the report's when the intervals were tight early


@dataclass(frozen=True)
class CrashedVariant:
    """A variant whose engine crashed (a signal, an abort, out of memory) while a stage ran it."""

    name: str
    path: Path
    stage: str  # "quality" or "measure"
    cause: str  # e.g. "SIGILL (Illegal instruction)"
    detail: str  # the whole message, with what to do


@dataclass(frozen=True)
class QualityReport:
    model: Path
    eval_text_sha256: str
    eval_tokens: int
    positions_scored: int  # the evaluation text's scored positions; a variant may stop early (its own count)
    window: int
    top_k_stored: int
    outside_top_k_mass: float  # the reference's mean probability mass outside the stored top-k (KLD's blind spot)
    reference_perplexity: float
    reference_task_accuracy: float | None
    tasks: int
    gate: dict[str, float | None]
    variants: tuple[VariantQuality, ...]
    crashed: tuple[CrashedVariant, ...] = ()  # scored by nobody: their engine crashed
    behaviour_prompts: int = 0  # built-in behaviour prompts and the user's tasks, as answered by the reference
    behaviour_checkable: int = 0
    reference_behaviour_correct: int = 0
    behaviour_skipped: tuple[str, ...] = ()  # prompts left out, with why (e.g. longer than the context)

    @property
    def passing(self) -> tuple[VariantQuality, ...]:
        return tuple(v for v in self.variants if v.passed)


@dataclass(frozen=True)
class Candidate:
    """One variant as selection sees it: its quality verdict, what it needs, how fast it decodes there."""

    name: str
    bytes: int  # size on disk
    passed_gate: bool
    gate_reasons: tuple[str, ...]
    kld_mean: float
    ppl_ratio: float
    memory_bytes: int  # needed on the target (measured or predicted)
    decode_tps: float | None  # on the target (measured or predicted); None when unknown
    measured: bool  # True: measured on the target itself; False: predicted


@dataclass(frozen=True)
class Rejection:
    name: str
    reason: RejectionReason
    detail: str  # the numbers behind it


@dataclass(frozen=True)
class Decision:
    chosen: str
    prefer: str
    budget_bytes: int
    why: str
    rejected: tuple[Rejection, ...]
