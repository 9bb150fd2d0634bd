"""The training loop, on accelerate: the same code runs on one CPU, one GPU, or many processes under
`accelerate launch` (DDP, FSDP or DeepSpeed, as the accelerate config says).

One step is one optimizer update over `batch_size` sequences per process (times `grad_accum` micro-batches). The
order of sequences is fixed by the seed (a fresh permutation each epoch), so a resumed run sees exactly the
batches the killed one would have. Every `save_every` steps the whole state (weights, optimizer, scheduler, random
generators) is saved by accelerate with our own `state.json` (step, loss history, evaluations); only the newest
checkpoint is kept.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import atomic_output_file
from edgepack.core.progress import STDERR
from edgepack.distill.data import TrainingSequence
from edgepack.distill.losses import LossSettings, combined_loss
from edgepack.distill.teacher_targets import SparseTargets

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_share: float = 0.05
    weight_decay: float = 0.0
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (accelerate's names)
    gradient_checkpointing: bool = False
    lora_rank: int | None = None
    qlora: bool = False  # the model is a 4-bit base (edgepack/distill/qlora.py)


@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0  # training time, summed over resumed runs (evaluations not counted)
    tokens: int = 0  # scored tokens trained on
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss of the step)
    evaluations: list[dict] = field(default_factory=list)  # {"step": n, metric: value, ...}
    resumed_from: list[int] = field(default_factory=list)


def total_steps(sequences: int, batch_size: int, processes: int, grad_accum: int, max_steps: int | None,
                epochs: float | None) -> int:
    if max_steps is not None:
        return max_steps
    per_epoch = max(1, math.ceil(sequences / (batch_size * processes * grad_accum)))
    return max(1, math.ceil((epochs or 1.0) * per_epoch))


def batch_indices(step: int, micro: int, settings: TrainSettings, count: int, rank: int, processes: int) -> list[int]:
    """The sequences one process trains on at (step, micro-batch): a seeded permutation per epoch, wrapping."""
    per_micro = settings.batch_size * processes
    start = (step * settings.grad_accum + micro) * per_micro
    indices = []
    for position in range(start + rank * settings.batch_size, start + (rank + 1) * settings.batch_size):
        epoch, offset = divmod(position, count)
        indices.append(int(_epoch_order(settings.seed + epoch, count)[offset]))
    return indices


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(count)


def collate(sequences: list[TrainingSequence], targets: list[SparseTargets] | None, pad_id: int, device):
    width = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    scored = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence.input_ids)] = torch.tensor(sequence.input_ids)
        mask[row, :len(sequence.input_ids)] = 1
        scored[row, :len(sequence.scored)] = torch.tensor(sequence.scored)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "scored": scored.to(device),
             "targets": ids[:, 1:][scored].to(device)}
    if targets is not None:
        batch["top_ids"] = torch.from_numpy(np.concatenate([t.top_ids for t in targets])).long().to(device)
        batch["top_logprobs"] = torch.from_numpy(np.concatenate([t.top_logprobs for t in targets])).float().to(device)
        batch["rest_logmass"] = torch.from_numpy(np.concatenate([t.rest_logmass for t in targets])).float().to(device)
    return batch


def latest_checkpoint(work_dir: Path) -> Path | None:
    found = [p for p in work_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def read_state(checkpoint: Path) -> TrainState:
    data = json.loads((checkpoint / STATE_FILE).read_text())
    state = TrainState(**{k: v for k, v in data.items() if k in TrainState.__dataclass_fields__})
    state.losses = [tuple(x) for x in state.losses]
    return state


def prepare_model(model, settings: TrainSettings):
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if settings.qlora:  # gradients into the float32 layers' inputs, norms in float32 (peft's k-bit preparation)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    if settings.lora_rank:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
                            target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model


def train(model, sequences: list[TrainingSequence], targets: list[SparseTargets] | None, loss: LossSettings,
          settings: TrainSettings, work_dir: Path, pad_id: int, accelerator, resume: bool,
          evaluate: Callable[[object], dict] | None, show_progress: bool = True) -> tuple[object, TrainState, dict]:
    """Train `model` for settings.max_steps optimizer steps; returns the (unwrapped) model, the state, and the whole
    state dict gathered on the main process (from every shard, under FSDP or ZeRO-3)."""
    from transformers import get_cosine_schedule_with_warmup

    model = prepare_model(model, settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    warmup = int(settings.warmup_share * settings.max_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, settings.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    checkpoint = latest_checkpoint(work_dir) if resume else None
    if checkpoint is not None:
        # a 4-bit base is quantized again from the student's folder, the same each time: what a QLoRA checkpoint
        # must bring back is the adapters (bitsandbytes' saved quantization states have no place in a fresh model)
        accelerator.load_state(str(checkpoint), **({"strict": False} if settings.qlora else {}))
        state = read_state(checkpoint)
        state.resumed_from.append(state.step)
        if state.step > settings.max_steps:
            raise EdgepackError(f"the checkpoint in {work_dir} is at step {state.step}, past --max-steps "
                                f"{settings.max_steps}")
    model.train()
    # every process evaluates (a sharded model, FSDP or ZeRO-3, needs all of them for a forward pass); the main
    # process's figures are kept
    if evaluate is not None and not state.evaluations:
        state.evaluations.append({"step": 0, **evaluate(accelerator.unwrap_model(model))})
    progress = _Progress(settings.max_steps, state.step, enabled=show_progress and accelerator.is_main_process)
    with progress:
        while state.step < settings.max_steps:
            started = time.perf_counter()
            step_losses, step_tokens = [], 0
            for micro in range(settings.grad_accum):
                indices = batch_indices(state.step, micro, settings, len(sequences), accelerator.process_index,
                                        accelerator.num_processes)
                batch = collate([sequences[i] for i in indices], [targets[i] for i in indices] if targets else None,
                                pad_id, accelerator.device)
                with accelerator.accumulate(model), accelerator.autocast():
                    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False)
                    logits = output.logits[:, :-1][batch["scored"]]
                    value, _ = combined_loss(logits, batch["targets"], batch.get("top_ids"),
                                             batch.get("top_logprobs"), batch.get("rest_logmass"), loss)
                    accelerator.backward(value)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                step_losses.append(float(value.detach()))
                step_tokens += int(batch["targets"].numel())
            state.step += 1
            state.seconds += time.perf_counter() - started
            state.tokens += step_tokens * accelerator.num_processes
            mean_loss = float(accelerator.gather(torch.tensor([np.mean(step_losses)], device=accelerator.device))
                              .mean())
            state.losses.append((state.step, mean_loss))
            progress.update(state, mean_loss)
            last = state.step == settings.max_steps
            if evaluate is not None and (last or state.step % settings.eval_every == 0):
                state.evaluations.append({"step": state.step, **evaluate(accelerator.unwrap_model(model))})
                progress.note(state.evaluations[-1])
            if not last and state.step % settings.save_every == 0:
                save_checkpoint(accelerator, work_dir, state)
    full_state = accelerator.get_state_dict(model)
    # without the mixed-precision wrapper: the "after" figures are measured in float32, as the "before" ones
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False), state, full_state


def save_checkpoint(accelerator, work_dir: Path, state: TrainState) -> None:
    target = work_dir / f"{CHECKPOINT_PREFIX}{state.step}"
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        with atomic_output_file(target / STATE_FILE) as tmp:
            tmp.write_text(json.dumps(asdict(state)))
        for older in work_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            if older != target:
                shutil.rmtree(older, ignore_errors=True)
    accelerator.wait_for_everyone()


class _Progress:
    """A bar on stderr with the loss, tokens per second and the time left."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.enabled = enabled
        fields = TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tok/s  eval {task.fields[eval]}")
        self.progress = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(), fields,
                                 TimeRemainingColumn(), console=STDERR, disable=not enabled)
        self.task = self.progress.add_task("distill", total=total, completed=done, loss="-", speed="-", eval="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, state: TrainState, loss: float) -> None:
        speed = state.tokens / state.seconds if state.seconds else 0.0
        self.progress.update(self.task, completed=state.step, loss=f"{loss:.4f}", speed=f"{speed:,.0f}")

    def note(self, evaluation: dict) -> None:
        self.progress.update(self.task, eval=f"KLD {evaluation['kld_mean']:.4f}")
