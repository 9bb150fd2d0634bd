"""What the commands print: tables and lines for people (tables on stdout, notes on stderr), JSON for programs,
and an EdgepackError as its message and exit code."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from edgepack.core.artifacts import QualityReport, Variant
from edgepack.core.errors import EdgepackError

STDERR = Console(stderr=True, soft_wrap=True)


def stdout_console() -> Console:
    """Tables on stdout; wide enough to stay readable when stdout is not a terminal."""
    console = Console(soft_wrap=True)
    return console if console.is_terminal else Console(soft_wrap=True, width=160)


def print_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2))


def note(text: str) -> None:
    STDERR.print(text, highlight=False, markup=False)


def handles_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn an EdgepackError into its message on stderr and its exit code (the table in edgepack.core.errors)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except EdgepackError as exc:
            STDERR.print(f"[bold red]error:[/] {exc}", highlight=False)
            sys.exit(exc.exit_code)

    return wrapper


def table(title: str | None, columns: tuple[str, ...], rows: list[tuple[str, ...]], **options: Any) -> Table:
    drawn = Table(title=title, **options)
    for column in columns:
        drawn.add_column(column)
    for row in rows:
        drawn.add_row(*row)
    return drawn


def variants_table(variants: list[Variant]) -> Table:
    return table("variants", ("kind", "path", "MiB", "sha256"),
                 [(v.kind, str(v.path), f"{v.bytes / 2**20:.1f}", v.sha256[:16]) for v in variants])


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    drawn = Table(show_header=False, title=title)
    drawn.add_column(style="bold")
    drawn.add_column()
    for key, value in rows:
        drawn.add_row(key, value)
    return drawn


def quality_table(report: QualityReport) -> Table:
    return table(
        f"quality vs {report.model.name} (reference perplexity {report.reference_perplexity:.3f} over "
        f"{report.positions_scored} positions, the second half of each {report.window}-token window; a variant stops "
        f"once its intervals are tight; the gate judges the upper ends of the 95% intervals)",
        ("variant", "engine", "positions", "PPL", "PPL ratio [95%]", "KLD mean [95%]", "KLD p99", "same top-1",
         "RMS Δp", "tasks", "gate"),
        [(v.name, v.engine, str(v.positions_scored), f"{v.perplexity:.3f}",
          f"{v.ppl_ratio:.4f} [{v.ppl_ratio_ci[0]:.4f}, {v.ppl_ratio_ci[1]:.4f}]",
          f"{v.kld_mean:.5f} [{v.kld_mean_ci[0]:.5f}, {v.kld_mean_ci[1]:.5f}]", f"{v.kld_p99:.4f}",
          f"{v.same_top1:.1%}", f"{v.rms_delta_p:.4f}", "-" if v.task_accuracy is None else f"{v.task_accuracy:.0%}",
          "pass" if v.passed else "FAIL") for v in report.variants])


def behaviour_table(report: QualityReport) -> Table | None:
    """The variants' answers to the behaviour prompts; None when none were asked."""
    rows = [(v.name, f"{b.identical}/{b.prompts} ({b.identical_share:.0%})",
             f"{b.correct}/{b.checkable} (reference {b.reference_correct})", f"-{b.only_reference_correct} "
             f"+{b.only_variant_correct}, p={b.mcnemar_p:.3g}",
             f"{b.answer_kld_mean:.4f} [{b.answer_kld_ci[0]:.4f}, {b.answer_kld_ci[1]:.4f}]",
             f"{b.answer_same_top1:.1%}",
             "-" if b.median_first_divergence is None else f"{b.median_first_divergence:g}")
            for v in report.variants if (b := v.behaviour) is not None]
    if not rows:
        return None
    return table(f"answers to {report.behaviour_prompts} behaviour prompts vs the reference's greedy answers",
                 ("variant", "same answer", "right", "lost/gained (McNemar)", "answer KLD [95%]", "answer top-1",
                  "first divergence (median token)"), rows)
