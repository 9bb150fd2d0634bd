"""`edgepack eval`: variants against the original model's logits, and the gate."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from edgepack.cli.rendering import behaviour_table, print_json, quality_table, stdout_console
from edgepack.core.artifacts import to_json_dict


def gate_options(command):
    """The gate's options, shared by `eval` and `build`: the command receives them as one `gate` argument."""

    @functools.wraps(command)
    def with_gate(*args, max_ppl_increase: str, max_kld: float, min_task_accuracy: str | None,
                  max_answer_kld: float, correctness_alpha: float, **kwargs):
        from edgepack.quality.gate import Gate

        return command(*args, gate=Gate.from_options(max_ppl_increase, max_kld, min_task_accuracy, max_answer_kld,
                                                     correctness_alpha), **kwargs)

    for option in reversed((
            click.option("--max-ppl-increase", default="5%", show_default=True, help="Gate: perplexity rise allowed."),
            click.option("--max-kld", type=float, default=0.05, show_default=True,
                         help="Gate: mean KL divergence allowed."),
            click.option("--min-task-accuracy", default=None, help="Gate: share of tasks right (e.g. 80% or 0.8)."),
            click.option("--max-answer-kld", type=float, default=0.10, show_default=True,
                         help="Gate: mean KL divergence allowed on the reference's answers to the behaviour prompts."),
            click.option("--correctness-alpha", type=float, default=0.05, show_default=True,
                         help="Gate: fail a variant right on significantly fewer checkable prompts than the reference "
                              "(McNemar's test at this level; 0 turns it off)."),
            click.option("--behaviour/--no-behaviour", default=True, show_default=True,
                         help="Ask the built-in behaviour prompts (chat models) and compare the answers."))):
        with_gate = option(with_gate)
    return with_gate


@click.command("eval")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--eval-text", type=click.Path(path_type=Path), default=None,
              help="Evaluation text (default: edgepack's built-in text of ~16,700 words).")
@click.option("--tasks", "tasks_file", type=click.Path(path_type=Path), default=None,
              help="JSONL of {prompt|messages, expected, match: contains|number|json|exact}, asked with the "
                   "behaviour prompts.")
@gate_options
@click.option("--context", "window", type=int, default=None, help="Evaluation window in tokens (default 512).")
@click.option("--threads", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def eval_command(paths: tuple[Path, ...], eval_text: Path | None, tasks_file: Path | None, gate, behaviour: bool,
                 window: int | None, threads: int | None, as_json: bool) -> None:
    """Measure VARIANTs against [MODEL] (a Hugging Face directory; default: the demo student).

    Usage: edgepack eval [MODEL] VARIANT... Exit 5 when no variant passes the gate."""
    from edgepack.quality.evaluate import EvalOptions, evaluate, split_reference
    from edgepack.quality.gate import require_a_pass
    from edgepack.quality.reference import read_eval_text
    from edgepack.quality.tasks import load_tasks
    from edgepack.student import resolve_model

    model, variants = split_reference(list(paths))
    options = EvalOptions(eval_text=read_eval_text(eval_text),
                          tasks=tuple(load_tasks(tasks_file)) if tasks_file is not None else (),
                          gate=gate, behaviour=behaviour, window=window, threads=threads)
    report = evaluate(resolve_model(model), variants, options)
    if as_json:
        print_json(to_json_dict(report))
    else:
        console = stdout_console()
        console.print(quality_table(report))
        if (answers := behaviour_table(report)) is not None:
            console.print(answers)
        for v in report.variants:
            if v.reasons:
                console.print(f"{v.name} fails the gate: {'; '.join(v.reasons)}", highlight=False)
        for c in report.crashed:
            console.print(f"{c.name} CRASHED: {c.detail}", highlight=False)
    require_a_pass(report)
