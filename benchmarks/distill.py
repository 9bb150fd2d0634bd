"""Logit distillation against cross-entropy-only training, on the demo student with half its layers dropped.

    python -m benchmarks.distill [--steps 160] [--rows 0,1,2] [--precision bf16] [--json]

Teacher: the demo student (SmolLM2-135M-Instruct). Student: the teacher with half its layers dropped (15 of 30,
first and last kept). Training text: the docstrings of Python's standard library on this machine (English prose
about software; 240,000 characters, ~57,000 tokens; generated here, never shipped). Held-out text: edgepack's evaluation
text (prose), or with `--held-out docstrings` the next 40,000 characters of docstrings (none of them trained on). Each
row trains the same student on the same data for the same steps and seed; only the loss differs. Each row runs
`edgepack distill` in a fresh process, one after the other, so the timings do not share the 2 cores. Prints a table
(stderr) and writes the learning curves of every row to one PNG.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from benchmarks.common import resolve_demo_model, run_measured

ROWS = {
    "logit KD (forward KL, T=2, alpha=0.5)": ["--loss", "forward-kl", "--temperature", "2", "--alpha", "0.5"],
    "cross-entropy only (alpha=0)": ["--alpha", "0"],
    "logit KD (forward KL, T=1, alpha=1)": ["--loss", "forward-kl", "--temperature", "1", "--alpha", "1"],
}
HELD_OUT_CHARS = 40_000
SKIPPED_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}


def stdlib_docstrings(max_chars: int) -> str:
    """The standard library's module, class and function docstrings of 200+ characters, each once, in module order."""
    warnings.filterwarnings("ignore")
    seen, texts, total = set(), [], 0
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIPPED_MODULES:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-only modules
            continue
        objects = [module] + [value for key, value in vars(module).items() if not key.startswith("_")
                              and (inspect.isclass(value) or inspect.isfunction(value))
                              and getattr(value, "__module__", None) == name]
        for value in objects:
            doc = inspect.getdoc(value)
            if doc and len(doc) >= 200 and doc not in seen:
                seen.add(doc)
                texts.append(doc)
                total += len(doc) + 2
                if total >= max_chars:
                    return "\n\n".join(texts)
    return "\n\n".join(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--precision", default="bf16", help="bf16 (AMX CPUs and GPUs) or no")
    parser.add_argument("--data-chars", type=int, default=240_000)
    parser.add_argument("--held-out", choices=("docstrings", "builtin"), default="builtin",
                        help="docstrings: the next 40,000 characters of docstrings after the training text (same "
                             "kind of text, none of it trained on); builtin: edgepack's evaluation text (prose)")
    parser.add_argument("--rows", default="0,1,2", help="which rows, by index: " +
                        "; ".join(f"{i}: {name}" for i, name in enumerate(ROWS)))
    parser.add_argument("--out", type=Path, default=None, help="keep the students and the plot here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    teacher = resolve_demo_model()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="edgepack-distill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "stdlib_docstrings.txt"
    # made in a child process: importing the whole standard library here would swell every child's peak RSS
    code = (f"from benchmarks.distill import stdlib_docstrings; "
            f"print(stdlib_docstrings({args.data_chars + HELD_OUT_CHARS}), end='')")
    corpus = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    cut = corpus.rfind("\n\n", 0, args.data_chars)  # between two docstrings
    data.write_text(corpus[:cut], encoding="utf-8")
    held_out = work / "held_out_docstrings.txt"
    held_out.write_text(corpus[cut + 2:], encoding="utf-8")
    held_out_args = ["--eval-text", str(held_out)] if args.held_out == "docstrings" else []
    names = [list(ROWS)[int(i)] for i in args.rows.split(",")]
    results = []
    for index, name in enumerate(names):
        out = work / f"student-{index}"
        command = [sys.executable, "-m", "edgepack", "distill", "--teacher", str(teacher), "--from-teacher",
                   "--keep-layers", "0.5", "--data", str(data), "--max-steps", str(args.steps), "--seq-len",
                   str(args.seq_len), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--precision",
                   args.precision, "--eval-every", str(max(1, args.steps // 6)), "--out", str(out), "--force",
                   *held_out_args, *ROWS[name]]
        print(f"[{index + 1}/{len(names)}] {name}", file=sys.stderr)
        timing = run_measured(command)
        record = json.loads((out / "distill.json").read_text())
        results.append({"row": name, "wall_s": round(timing.wall_s, 1), "peak_rss_mib": round(timing.peak_rss_mib),
                         "record": record})
    _print_table(results)
    plot = _plot(results, work / "distill_curves.png")
    print(f"students, data and curves in {work} ({plot.name})", file=sys.stderr)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "record"} | {
            "before": r["record"]["before"], "after": r["record"]["after"], "steps": r["record"]["steps"],
            "train_seconds": r["record"]["train_seconds"], "evaluations": r["record"]["evaluations"]}
            for r in results], indent=2))


def _print_table(results: list[dict]) -> None:
    header = ("row", "steps", "train s", "wall s", "KLD before", "KLD after", "KLD cut", "PPL before", "PPL after",
              "same top-1", "answer KLD")
    lines = [header]
    for r in results:
        before, after = r["record"]["before"], r["record"]["after"]
        answer = after.get("answer_kld")
        lines.append((r["row"], str(r["record"]["steps"]), f"{r['record']['train_seconds']:.0f}", f"{r['wall_s']:.0f}",
                      f"{before['kld_mean']:.3f}", f"{after['kld_mean']:.3f}",
                      f"{1 - after['kld_mean'] / before['kld_mean']:.1%}", f"{before['perplexity']:.0f}",
                      f"{after['perplexity']:.1f}", f"{after['same_top1']:.1%}",
                      "-" if answer is None else f"{answer:.3f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)), file=sys.stderr)


def _plot(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for r in results:
        points = [(e["step"], e["kld_mean"]) for e in r["record"]["evaluations"]]
        axis.plot(*zip(*points, strict=True), marker="o", label=r["row"])
    axis.set_xlabel("step")
    axis.set_ylabel("held-out mean KLD to the teacher")
    axis.set_yscale("log")
    axis.legend()
    figure.suptitle("demo teacher, half-depth student")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
