"""`edgepack distill`: make a student from a teacher."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.rendering import print_json, stdout_console


@click.command("distill")
@click.option("--teacher", type=click.Path(path_type=Path), default=None,
              help="The teacher: a Hugging Face model folder (default: the demo student, when no --teacher-url).")
@click.option("--teacher-url", default=None, help="Or an OpenAI-compatible endpoint's base URL (--mode sequence).")
@click.option("--teacher-model", default=None, help="The model name the endpoint serves.")
@click.option("--teacher-key-env", default="EDGEPACK_TEACHER_API_KEY", show_default=True,
              help="Environment variable holding the endpoint's API key (the key never goes on the command line).")
@click.option("--allow-insecure-teacher", is_flag=True,
              help="Accept a plain http:// --teacher-url on another machine (the prompts and the API key then cross "
                   "the network unencrypted); http:// to localhost is always accepted.")
@click.option("--student", type=click.Path(path_type=Path), default=None, help="An existing student model folder.")
@click.option("--from-teacher", is_flag=True, help="Make the student from the teacher by dropping layers.")
@click.option("--keep-layers", default=None, help="With --from-teacher: layers kept, a count (12) or a share (0.5).")
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help="Training text: .txt/.md, or .jsonl/.json rows of {text} or {messages}. Repeatable.")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="JSONL of {prompt} or {messages} for the teacher to answer (default: edgepack's built-in set).")
@click.option("--mode", type=click.Choice(["logits", "sequence", "both"]), default="logits", show_default=True)
@click.option("--temperature", type=float, default=2.0, show_default=True, help="Softening of both distributions.")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Weight of the distillation loss; 1 - alpha goes to cross-entropy on the data (0: cross-entropy "
                   "only).")
@click.option("--loss", "loss_kind", type=click.Choice(["forward-kl", "reverse-kl", "jsd"]), default="forward-kl",
              show_default=True)
@click.option("--jsd-beta", type=float, default=0.5, show_default=True)
@click.option("--top-k", type=int, default=64, show_default=True, help="Teacher log-probabilities kept per position.")
@click.option("--max-steps", type=int, default=None)
@click.option("--epochs", type=float, default=None, help="Passes over the data (default 1, when no --max-steps).")
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per step and process.")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--eval-every", type=int, default=50, show_default=True)
@click.option("--save-every", type=int, default=50, show_default=True, help="Checkpoint every N steps.")
@click.option("--eval-text", type=click.Path(path_type=Path), default=None,
              help="Held-out text for the evaluations (default: edgepack's built-in evaluation text).")
@click.option("--eval-windows", type=int, default=12, show_default=True,
              help="Windows of the held-out text scored at each evaluation.")
@click.option("--behaviour/--no-behaviour", default=True, show_default=True,
              help="Teacher-force the behaviour prompts' answers before and after (chat teachers).")
@click.option("--samples", type=int, default=1, show_default=True, help="Teacher answers per prompt.")
@click.option("--sample-temperature", type=float, default=0.0, show_default=True,
              help="Temperature of the teacher's answers (0: greedy).")
@click.option("--max-answer-tokens", type=int, default=192, show_default=True)
@click.option("--lora", "lora_rank", type=int, default=None, help="Train low-rank adapters of this rank (merged at "
              "the end) instead of every weight.")
@click.option("--qlora", is_flag=True, help="Train the --lora adapters on a 4-bit (NF4) copy of the weights "
              "(bitsandbytes: pip install 'edgepack[qlora]'); they are merged into the full-precision weights.")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 on a CUDA GPU that has it, else float32; bf16 on a CPU with AMX is ~1.4x faster.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the student.")
@click.option("--resume", is_flag=True, help="Continue an unfinished run in --out from its last checkpoint.")
@click.option("--force", is_flag=True, help="Replace a finished student in --out.")
@click.option("--keep-checkpoints", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print distill.json on stdout.")
def distill(teacher, teacher_url, teacher_model, teacher_key_env, allow_insecure_teacher, student, from_teacher,
            keep_layers, data, prompts, mode, temperature, alpha, loss_kind, jsd_beta, top_k, max_steps, epochs,
            seq_len, lr, batch_size, grad_accum, eval_every, save_every, eval_text, eval_windows, behaviour, samples,
            sample_temperature, max_answer_tokens, lora_rank, qlora, gradient_checkpointing, precision, device,
            threads, seed, out, resume, force, keep_checkpoints, as_json) -> None:
    """Distil a student from a teacher: logit (token-level) or sequence-level knowledge distillation.

    Example: edgepack distill --from-teacher --keep-layers 0.5 --data notes.txt --max-steps 200 --out student/"""
    from edgepack.core.errors import EdgepackError
    from edgepack.distill import DistillOptions
    from edgepack.distill import distill as run_distill
    from edgepack.distill.losses import LossSettings
    from edgepack.distill.report import before_after_rows
    from edgepack.student import resolve_model

    if from_teacher != (keep_layers is not None):
        raise EdgepackError("--from-teacher and --keep-layers go together (--from-teacher --keep-layers 0.5)")
    if teacher is None and teacher_url is None:
        teacher = resolve_model(None)
    try:
        loss = LossSettings(kind=loss_kind, temperature=temperature, jsd_beta=jsd_beta, alpha=alpha)
    except ValueError as exc:
        raise EdgepackError(str(exc)) from exc
    result = run_distill(DistillOptions(
        out=out, teacher=teacher, teacher_url=teacher_url, teacher_model=teacher_model,
        teacher_key_env=teacher_key_env, allow_insecure_teacher=allow_insecure_teacher, student=student,
        keep_layers=keep_layers, data=tuple(data),
        prompts=prompts, mode=mode, loss=loss, top_k=top_k, max_steps=max_steps, epochs=epochs, seq_len=seq_len,
        lr=lr, batch_size=batch_size, grad_accum=grad_accum, eval_every=eval_every, save_every=save_every,
        eval_text=eval_text, eval_windows=eval_windows, behaviour=behaviour, samples=samples,
        sample_temperature=sample_temperature, max_answer_tokens=max_answer_tokens, lora_rank=lora_rank,
        qlora=qlora, gradient_checkpointing=gradient_checkpointing, precision=precision, device=device, threads=threads,
        seed=seed, resume=resume, force=force, keep_checkpoints=keep_checkpoints, show_progress=not as_json))
    if not result.main_process:
        return  # under `accelerate launch`, the main process reports
    if as_json:
        print_json(result.record)
        return
    from rich.table import Table

    table = Table(title=f"distilled into {result.out} ({result.steps} steps, {result.seconds:.0f} s)")
    for column in ("metric", "before", "after"):
        table.add_column(column)
    for row in before_after_rows(result.before, result.after):
        table.add_row(*row)
    stdout_console().print(table)
