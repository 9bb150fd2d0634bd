"""`edgepack build`: the whole pipeline for one target."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.convert import imatrix_choice, imatrix_options
from edgepack.cli.device_options import allow_predicted_option, measure_on_options, ssh_device
from edgepack.cli.quality import gate_options
from edgepack.cli.rendering import print_json, stdout_console, table
from edgepack.core.artifacts import to_json_dict
from edgepack.select import PREFERENCES


@click.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--target", "target_name", default=None,
              help="A shipped target (see `edgepack targets`) or host (this machine). Default: host.")
@click.option("--profile", "profile_file", type=click.Path(path_type=Path), default=None,
              help="A target profile file of your own instead of --target.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("dist"), show_default=True)
@click.option("--formats", default=None,
              help="Formats (their default kinds) and/or variant kinds such as gguf-q8_0. Default: every "
                   "registered format (gguf, onnx).")
@click.option("--context", type=int, default=None, help="Context the server allocates (default: model's, max 4096).")
@gate_options
@click.option("--tasks", "tasks_file", type=click.Path(path_type=Path), default=None,
              help="JSONL of {prompt|messages, expected, match}: your own prompts, for the gate's task accuracy.")
@click.option("--eval-text", type=click.Path(path_type=Path), default=None, help="Evaluation text for the gate.")
@click.option("--prefer", type=click.Choice(PREFERENCES), default="speed", show_default=True)
@imatrix_options
@click.option("--offline-wheels", is_flag=True, help="Carry the target's wheels and an install.sh in the bundle.")
@click.option("--threads", type=int, default=None, help="Threads for measuring here (default: physical cores).")
@measure_on_options
@allow_predicted_option
@click.option("--force", is_flag=True, help="Recompute every stage instead of using the cache.")
@click.option("--chat-template", default=None,
              help="FILE (Jinja) or NAME (chatml, llama2, plain): stored in the bundle and served instead of the "
                   "model's own template; a model without one is otherwise served with chatml.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def build(model: Path | None, target_name: str | None, profile_file: Path | None, out_dir: Path,
          formats: str | None, context: int | None, gate, behaviour: bool, tasks_file: Path | None,
          eval_text: Path | None, prefer: str,
          no_imatrix: bool, calibration_file: Path | None, offline_wheels: bool, threads: int | None,
          measure_on: str | None, ssh_config: Path | None, remote_python: str, allow_predicted: bool, force: bool,
          chat_template: str | None, as_json: bool) -> None:
    """Build the best bundle of MODEL (default: the demo student) for a target: convert, check quality, measure
    or predict, select, bundle. Exit 5: no variant passes the gate; exit 6: none fits the memory budget.

    With --measure-on ssh://user@host[:port] the variants are measured on that device too, and with no --target the
    device (as detected there) is the target."""
    from edgepack.measure.targets import resolve_target
    from edgepack.pipeline.build import BuildOptions, parse_formats
    from edgepack.pipeline.build import build as run_build
    from edgepack.quality.reference import read_eval_text
    from edgepack.quality.tasks import load_tasks
    from edgepack.student import resolve_model
    from runtimes.chat_templates import resolve_chat_template

    template = resolve_chat_template(chat_template) if chat_template else None  # a bad one fails before the build
    device = ssh_device(measure_on, ssh_config, remote_python, allow_predicted)
    target = None if device is not None and target_name is None and profile_file is None else \
        resolve_target(target_name, profile_file)
    imatrix, calibration_text = imatrix_choice(no_imatrix, calibration_file)
    options = BuildOptions(out_dir=out_dir, formats=parse_formats(formats), context=context,
                           gate=gate, behaviour=behaviour, tasks=tuple(load_tasks(tasks_file)) if tasks_file else (),
                           eval_text=read_eval_text(eval_text), prefer=prefer,  # type: ignore[arg-type]
                           imatrix=imatrix, calibration_text=calibration_text, offline_wheels=offline_wheels,
                           force=force, threads=threads, chat_template=template, measure_on=device,
                           allow_predicted=allow_predicted)
    result = run_build(resolve_model(model), target, options)
    if as_json:
        print_json({"bundle": str(result.bundle.directory), "archive": str(result.bundle.archive),
                    "chosen": result.decision.chosen, "decision": to_json_dict(result.decision),
                    "stages": [to_json_dict(s) for s in result.stages], "seconds": result.seconds})
        return
    rejected = {r.name: r for r in result.decision.rejected}
    by_name = {p.variant: p for p in result.performance}
    rows = []
    for q in result.quality.variants:
        p = by_name[q.name]
        verdict = "chosen" if q.name == result.decision.chosen else \
            f"{rejected[q.name].reason}: {rejected[q.name].detail}"
        rows.append((q.name, "pass" if q.passed else "FAIL", f"{q.kld_mean:.4f}", f"{q.ppl_ratio:.3f}",
                     f"{p.memory_bytes / 2**20:.0f}", "-" if p.decode_tps is None else f"{p.decode_tps:.1f}",
                     _figure_kind(p), verdict))
    rows += [(c.name, "-", "-", "-", "-", "-", "", f"crashed ({c.stage}): {c.cause}") for c in result.quality.crashed]
    console = stdout_console()
    console.print(table(f"{result.target.name}: chosen {result.decision.chosen}",
                        ("variant", "gate", "KLD", "PPL ratio", "memory MiB", "decode t/s", "", "verdict"), rows))
    stages = ", ".join(f"{s.name} {s.seconds:.1f}s ({s.ran} run, {s.cached} cached)" for s in result.stages)
    console.print(f"stages: {stages}; total {result.seconds:.1f}s", highlight=False)
    console.print(f"bundle: {result.bundle.directory}\narchive: {result.bundle.archive}", highlight=False)


def _figure_kind(p) -> str:
    if not p.is_prediction:
        return "measured on the device" if p.predicted_memory_bytes is not None else "measured"
    return "predicted" + (f" ±{p.decode_error:.0%}" if p.decode_error is not None and p.decode_tps else "")
