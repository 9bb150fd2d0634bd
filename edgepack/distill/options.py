"""What `edgepack distill` is asked to do, and what it made."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgepack.distill.losses import LossSettings

MODES = ("logits", "sequence", "both")
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class DistillOptions:
    out: Path
    teacher: Path | None = None  # a Hugging Face folder
    teacher_url: str | None = None  # or an OpenAI-compatible endpoint (sequence mode)
    teacher_model: str | None = None
    teacher_key_env: str = "EDGEPACK_TEACHER_API_KEY"
    allow_insecure_teacher: bool = False  # plain http:// to a teacher on another machine
    student: Path | None = None  # an existing Hugging Face student
    keep_layers: str | None = None  # or the teacher with layers dropped: a count ("15") or a share ("0.5")
    data: tuple[Path, ...] = ()
    prompts: Path | None = None  # None: edgepack's built-in prompt set
    mode: str = "logits"
    loss: LossSettings = field(default_factory=LossSettings)
    top_k: int = 64
    max_steps: int | None = None
    epochs: float | None = None
    seq_len: int = 512
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    eval_every: int = 50
    save_every: int = 50
    eval_text: Path | None = None  # None: edgepack's built-in evaluation text
    eval_windows: int = 12  # windows of the held-out text scored at each evaluation
    behaviour: bool = True  # teacher-force the behaviour prompts' answers before and after (chat teachers)
    samples: int = 1  # teacher answers per prompt (sequence-level)
    sample_temperature: float = 0.0
    max_answer_tokens: int = 192
    lora_rank: int | None = None
    qlora: bool = False  # the adapters train on a 4-bit (NF4) copy of the weights (edgepack/distill/qlora.py)
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 on a CUDA device that has it, else float32
    device: str = "auto"  # auto: cuda when torch sees one, else cpu
    threads: int | None = None
    seed: int = 0
    resume: bool = False
    force: bool = False  # replace a finished distillation in --out
    keep_checkpoints: bool = False
    show_progress: bool = True


@dataclass(frozen=True)
class DistillResult:
    out: Path
    steps: int
    seconds: float
    tokens: int
    before: dict
    after: dict
    teacher_cache_hit: bool | None  # None: no teacher targets were needed
    record: dict  # what distill.json holds
    main_process: bool = True  # False in the other processes of a multi-process run (they print nothing)
