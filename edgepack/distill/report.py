"""What a distillation leaves beside the student: distill.json (the record `edgepack build` carries into the
bundle) and report.md with the learning curve as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from edgepack.student.load import DISTILL_RECORD

RECORD_FILE = DISTILL_RECORD
REPORT_FILE = "report.md"
CURVE_FILE = "learning_curve.png"
METRICS = (("kld_mean", "mean KLD to the teacher", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}"),
           ("ppl_ratio", "perplexity / teacher's", "{:.3f}"), ("same_top1", "same top-1 as the teacher", "{:.1%}"),
           ("answer_kld", "answer KLD (behaviour prompts)", "{:.4f}"),
           ("answer_same_top1", "answer same top-1", "{:.1%}"))


def write_record(directory: Path, record: dict) -> None:
    (directory / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_record(model_dir: Path) -> dict | None:
    """A student's distill.json, if it has one (a model folder made by `edgepack distill`)."""
    path = Path(model_dir) / RECORD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def before_after_rows(before: dict, after: dict) -> list[tuple[str, str, str]]:
    rows = []
    for key, label, form in METRICS:
        if before.get(key) is None and after.get(key) is None:
            continue
        rows.append((label, _fmt(form, before.get(key)), _fmt(form, after.get(key))))
    return rows


def _fmt(form: str, value) -> str:
    return "-" if value is None else form.format(value)


def plot_curve(directory: Path, losses: list, evaluations: list[dict]) -> str | None:
    """The training loss and the held-out KLD against the step, as a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=110)
    if losses:
        steps, values = zip(*losses, strict=True)
        loss_axis.plot(steps, values, color="tab:blue", linewidth=1, label="training loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    kld_axis = loss_axis.twinx()
    points = [(e["step"], e["kld_mean"]) for e in evaluations if e.get("kld_mean") is not None]
    if points:
        steps, values = zip(*points, strict=True)
        kld_axis.plot(steps, values, color="tab:red", marker="o", label="held-out KLD to the teacher")
    kld_axis.set_ylabel("held-out mean KLD to the teacher", color="tab:red")
    kld_axis.set_yscale("log")
    figure.suptitle("edgepack distill: learning curve")
    figure.tight_layout()
    figure.savefig(directory / CURVE_FILE)
    plt.close(figure)
    return CURVE_FILE


def write_report(directory: Path, record: dict, curve: str | None) -> None:
    lines = ["# Distillation report", "",
             f"Teacher: {record['teacher']['name']} ({record['teacher']['kind']}). "
             f"Student: {record['student']['initialisation']}, {record['student']['parameters']:,} parameters.",
             f"Mode {record['settings']['mode']}, loss {record['settings']['loss']} at temperature "
             f"{record['settings']['temperature']}, alpha {record['settings']['alpha']}; {record['steps']} steps, "
             f"{record['tokens_trained']:,} tokens, {record['train_seconds']:.0f} s of training on "
             f"{record['device']}.",
             f"Held-out text: {record['held_out']['source']} ({record['held_out']['positions']:,} positions scored; "
             "not training data).", "",
             "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {label} | {b} | {a} |" for label, b, a in before_after_rows(record["before"], record["after"])]
    if curve:
        lines += ["", f"![learning curve]({curve})"]
    if record.get("evaluations"):
        precision = "float32" if record["settings"]["precision"] == "no" else record["settings"]["precision"]
        lines += ["", f"During training (at the training precision, {precision}; before "
                      "and after above are in float32):", "", "| step | mean KLD | perplexity |", "|---|---|---|"]
        lines += [f"| {e['step']} | {e['kld_mean']:.4f} | {e['perplexity']:.3f} |" for e in record["evaluations"]]
    (directory / REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
