"""The `edgepack` command: parses options, calls a stage, prints. No logic lives here."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.table import Table

from edgepack.artifacts import to_json_dict
from edgepack.errors import EdgepackError

STDERR = Console(stderr=True, soft_wrap=True)


def stdout_console() -> Console:
    """Tables on stdout; wide enough to stay readable when stdout is not a terminal."""
    console = Console(soft_wrap=True)
    return console if console.is_terminal else Console(soft_wrap=True, width=160)


def _print_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2))


def handles_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn an EdgepackError into its message on stderr and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except EdgepackError as exc:
            STDERR.print(f"[bold red]error:[/] {exc}", highlight=False)
            sys.exit(exc.exit_code)

    return wrapper


def _gate(max_ppl_increase: str, max_kld: float, min_task_accuracy: str | None):
    from edgepack.quality.gate import Gate, parse_fraction

    return Gate(max_ppl_increase=parse_fraction(max_ppl_increase, "--max-ppl-increase"), max_kld=max_kld,
                min_task_accuracy=parse_fraction(min_task_accuracy, "--min-task-accuracy")
                if min_task_accuracy is not None else None)


def _read_eval_text(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise EdgepackError(f"evaluation text {path} does not exist")
    return path.read_text(encoding="utf-8")


@click.group()
@click.version_option(package_name="edgepack")
def main() -> None:
    """Package a small language model for an edge device."""


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--to", "kinds", default="gguf-f16,gguf-q8_0,gguf-q4_k_m", show_default=True,
              help="Comma-separated variant kinds: gguf-f32, gguf-f16, gguf-bf16, gguf-<llama.cpp type>, "
                   "onnx-fp32, onnx-int8, onnx-int4.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--force", is_flag=True, help="Overwrite outputs that exist.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (loaded with weights_only=True).")
@click.option("--check-logits", is_flag=True,
              help="Compare llama.cpp's F32 logits with transformers' (needs gguf-f32).")
@click.option("--threads", type=int, default=None, help="Threads for quantization (default: all cores).")
@click.option("--int8-isa", type=click.Choice(["avx2", "avx512-vnni", "arm64"]), default=None,
              help="onnx-int8: the target's integer kernels (default: detected on this machine).")
@click.option("--int4-block-size", type=int, default=32, show_default=True, help="onnx-int4: weights per block.")
@click.option("--json", "as_json", is_flag=True, help="Print the variants as JSON on stdout.")
@handles_errors
def convert(model: Path | None, kinds: str, out_dir: Path, force: bool, allow_pickle: bool, check_logits: bool,
            threads: int | None, int8_isa: str | None, int4_block_size: int, as_json: bool) -> None:
    """Convert a Hugging Face MODEL directory (default: the demo student) to deployable variants."""
    from edgepack.convert import convert as run_convert, parse_kinds
    from edgepack.demo import resolve_model
    from edgepack.registry import ConvertOptions

    options = ConvertOptions(force=force, allow_pickle=allow_pickle, check_logits=check_logits, threads=threads,
                             int8_isa=int8_isa, int4_block_size=int4_block_size)
    variants = run_convert(resolve_model(model), parse_kinds(kinds), out_dir, options)
    if as_json:
        _print_json({"variants": [{"kind": v.kind, "path": str(v.path), "bytes": v.bytes, "sha256": v.sha256}
                                  for v in variants]})
        return
    table = Table(title="variants")
    for column in ("kind", "path", "MiB", "sha256"):
        table.add_column(column)
    for v in variants:
        table.add_row(v.kind, str(v.path), f"{v.bytes / 2**20:.1f}", v.sha256[:16])
    stdout_console().print(table)


@main.command("import-gguf")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output HF directory.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16"]), default="f32", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite the output directory if it exists.")
@handles_errors
def import_gguf_command(gguf_file: Path, out_dir: Path, dtype: str, force: bool) -> None:
    """Rebuild a Hugging Face model directory from a GGUF file (weights dequantized)."""
    from converters.gguf_parity import check_tokenizer_parity
    from converters.gguf_to_hf import import_gguf

    import_gguf(gguf_file, out_dir, dtype=dtype, force=force)
    parity = check_tokenizer_parity(gguf_file, out_dir)
    STDERR.print(f"tokenizer parity with llama.cpp ok ({parity.tokens_checked} tokens)")
    click.echo(str(out_dir))


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON on stdout.")
@handles_errors
def inspect(model: Path | None, as_json: bool) -> None:
    """Describe a Hugging Face MODEL directory, a GGUF file or a bundle (default: the demo student)."""
    from edgepack.bundle_inspect import is_bundle
    from edgepack.demo import resolve_model
    from edgepack.inspect import inspect_path, summary_rows

    if model is not None and is_bundle(model):
        _inspect_bundle(model, as_json)
        return
    summary = inspect_path(resolve_model(model))
    if as_json:
        _print_json(to_json_dict(summary))
        return
    table = Table(show_header=False, title=str(summary.path))
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary_rows(summary):
        table.add_row(key, value)
    stdout_console().print(table)


def _inspect_bundle(path: Path, as_json: bool) -> None:
    from edgepack.bundle_inspect import inspect_bundle

    summary = inspect_bundle(path)
    if as_json:
        _print_json(to_json_dict(summary))
        return
    console = stdout_console()
    model = summary.model
    console.print(f"bundle {summary.path}: {model.get('name')} ({model.get('architecture')}, "
                  f"{model.get('parameter_count', 0):,} parameters) for {summary.target}", highlight=False)
    status = "verified: every file matches the manifest" if summary.verified else f"DOES NOT VERIFY: {summary.problem}"
    console.print(status, highlight=False)
    console.print(f"chosen: {summary.why}", highlight=False)
    for r in summary.rejected:
        console.print(f"  not {r['name']}: {r['reason']} ({r['detail']})", highlight=False)
    server = summary.server
    console.print(f"server: {server.get('engine')} ({server.get('device')}) on {server.get('model_path')}, context "
                  f"{server.get('context')}, "
                  f"{server.get('threads')} threads, {server.get('host')}:{server.get('port')}", highlight=False)
    table = Table(title="files")
    table.add_column("path")
    table.add_column("MiB", justify="right")
    table.add_column("sha256")
    for f in summary.files:
        table.add_row(f["path"], f"{f['bytes'] / 2**20:.2f}", f["sha256"][:16])
    console.print(table)
    if not summary.verified:
        sys.exit(7)


@main.command()
@click.argument("variant", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user message through the model's chat template.")
@click.option("--system", default=None, help="With --chat: a system message.")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0: no top-k cut.")
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
@click.option("--engine", type=click.Choice(["llamacpp", "onnxrt", "torch"]), default=None,
              help="Default: chosen from the path (.gguf, ONNX directory, HF directory).")
@click.option("--threads", type=int, default=None, help="Default: one per physical core.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "metal"]), default="cpu", show_default=True)
@click.option("--context", "context_length", type=int, default=None, help="Context length to allocate.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@handles_errors
def run(variant: Path, prompt: str, chat: bool, system: str | None, max_tokens: int, temperature: float,
        top_p: float, top_k: int, seed: int | None, stop: tuple[str, ...], stream: bool, engine: str | None,
        threads: int | None, device: str, context_length: int | None, as_json: bool) -> None:
    """Generate from VARIANT (a .gguf file, an ONNX variant directory or a Hugging Face directory)."""
    from edgepack.generate import run_prompt
    from runtimes.base import GenerationOptions, LoadOptions

    if max_tokens < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-tokens")
    try:
        generation = GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                       seed=seed, stop=stop)
        on_text = (lambda text: click.echo(text, nl=False)) if stream and not as_json else None
        report = run_prompt(variant, prompt, chat=chat, system=system, generation=generation,
                            load=LoadOptions(threads=threads, context_length=context_length, device=device),
                            engine=engine, on_text=on_text)
    except ValueError as exc:  # sampler settings out of range
        raise EdgepackError(str(exc)) from exc
    if as_json:
        _print_json(to_json_dict(report))
        return
    if on_text is None:
        click.echo(report.text, nl=False)
    click.echo()
    speed = report.completion_tokens / report.seconds if report.seconds > 0 else 0.0
    STDERR.print(f"[{report.engine}] {report.completion_tokens} tokens, {speed:.1f} tokens/s, "
                 f"finished: {report.finish_reason}", highlight=False, markup=False)


@main.command("eval")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--eval-text", type=click.Path(path_type=Path), default=None,
              help="Evaluation text (default: edgepack's built-in text of ~2,400 words).")
@click.option("--tasks", "tasks_file", type=click.Path(path_type=Path), default=None,
              help="JSONL of {prompt|messages, expected, match: exact|contains|json}.")
@click.option("--max-ppl-increase", default="5%", show_default=True, help="Gate: perplexity rise allowed.")
@click.option("--max-kld", type=float, default=0.05, show_default=True, help="Gate: mean KL divergence allowed.")
@click.option("--min-task-accuracy", default=None, help="Gate: share of tasks right (e.g. 80% or 0.8).")
@click.option("--context", "window", type=int, default=None, help="Evaluation window in tokens (default 512).")
@click.option("--threads", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@handles_errors
def eval_command(paths: tuple[Path, ...], eval_text: Path | None, tasks_file: Path | None, max_ppl_increase: str,
                 max_kld: float, min_task_accuracy: str | None, window: int | None, threads: int | None,
                 as_json: bool) -> None:
    """Measure VARIANTs against [MODEL] (a Hugging Face directory; default: the demo student).

    Usage: edgepack eval [MODEL] VARIANT... Exit 5 when no variant passes the gate."""
    from edgepack.demo import resolve_model
    from edgepack.errors import NOTHING_PASSED_EXIT_CODE
    from edgepack.quality.evaluate import evaluate
    from edgepack.quality.tasks import load_tasks
    from runtimes.torch_reference import TorchRuntime

    model = None
    variants = list(paths)
    if len(variants) >= 2 and TorchRuntime.can_load(variants[0]):
        model = variants.pop(0)
    gate = _gate(max_ppl_increase, max_kld, min_task_accuracy)
    text = _read_eval_text(eval_text)
    tasks = load_tasks(tasks_file) if tasks_file is not None else None
    report = evaluate(resolve_model(model), variants, eval_text=text, tasks=tasks, gate=gate, window=window,
                      threads=threads)
    if as_json:
        _print_json(to_json_dict(report))
    else:
        table = Table(title=f"quality vs {report.model.name} (reference perplexity {report.reference_perplexity:.3f},"
                            f" {report.positions_scored} positions, window {report.window})")
        for column in ("variant", "engine", "PPL", "PPL ratio", "KLD mean", "KLD p99", "same top-1", "RMS Δp",
                       "tasks", "gate"):
            table.add_column(column)
        for v in report.variants:
            table.add_row(v.name, v.engine, f"{v.perplexity:.3f}", f"{v.ppl_ratio:.4f}", f"{v.kld_mean:.5f}",
                          f"{v.kld_p99:.4f}", f"{v.same_top1:.1%}", f"{v.rms_delta_p:.4f}",
                          "-" if v.task_accuracy is None else f"{v.task_accuracy:.0%}",
                          "pass" if v.passed else "FAIL")
        console = stdout_console()
        console.print(table)
        for v in report.variants:
            if v.reasons:
                console.print(f"{v.name} fails the gate: {'; '.join(v.reasons)}", highlight=False)
    if not report.passing:
        STDERR.print("no variant passes the quality gate", highlight=False)
        sys.exit(NOTHING_PASSED_EXIT_CODE)


@main.command()
@click.option("--profile", "profile_file", type=click.Path(path_type=Path), default=None,
              help="Validate and show a profile file of your own instead of listing.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON on stdout.")
@handles_errors
def targets(profile_file: Path | None, as_json: bool) -> None:
    """List the target device profiles (profiles/*.toml and host, detected from this machine)."""
    from edgepack.targets import all_targets, load_profile

    profiles = [load_profile(profile_file)] if profile_file is not None else all_targets()
    if as_json:
        _print_json({"targets": [to_json_dict(p) for p in profiles]})
        return
    table = Table(title="targets")
    for column in ("name", "arch", "accelerator", "cores", "memory GiB", "budget GiB", "bandwidth GB/s",
                   "engines", "wheel platform"):
        table.add_column(column)
    for p in profiles:
        bandwidth = f"{p.memory_bandwidth_gbps:g}" if p.memory_bandwidth_gbps else "to measure"
        table.add_row(p.name, p.arch, p.accelerator, str(p.cpu_cores), f"{p.memory_total_gib:g}",
                      f"{p.memory_budget_gib:g}", bandwidth, ", ".join(p.engines), p.python_platform)
    stdout_console().print(table)


@main.command()
@click.argument("variants", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--threads", type=int, default=None, help="Default: one per physical core.")
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=64, show_default=True)
@click.option("--runs", type=int, default=3, show_default=True, help="Measured runs after one warm-up.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON on stdout.")
@handles_errors
def profile(variants: tuple[Path, ...], threads: int | None, prompt_tokens: int, new_tokens: int, runs: int,
            as_json: bool) -> None:
    """Measure VARIANTs on this machine, each in a fresh process: load, memory, TTFT, prefill and decode t/s."""
    from edgepack.profiler import profile as run_profile

    for path in variants:
        if not path.exists():
            raise EdgepackError(f"{path} does not exist")
    result = run_profile(list(variants), threads, prompt_tokens, new_tokens, runs)
    if as_json:
        _print_json(to_json_dict(result))
        return
    table = Table(title=f"this machine: memory bandwidth {result.memory_bandwidth_gbps:.1f} GB/s (measured)")
    for column in ("variant", "engine", "threads", "load s", "peak RSS MiB", "model MiB", "TTFT ms", "prefill t/s",
                   "decode t/s", "decode min-max"):
        table.add_column(column)
    for m in result.variants:
        table.add_row(m.name, m.engine, str(m.threads), f"{m.load_s:.2f}", f"{m.peak_rss_mib:.0f}",
                      f"{m.model_rss_mib:.0f}", f"{m.ttft_s * 1000:.0f}", f"{m.prefill_tps:.1f}",
                      f"{m.decode_tps:.1f}", f"{m.decode_tps_min:.1f}-{m.decode_tps_max:.1f}")
    console = stdout_console()
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--target", "target_name", default=None,
              help="A shipped target (see `edgepack targets`) or host (this machine). Default: host.")
@click.option("--profile", "profile_file", type=click.Path(path_type=Path), default=None,
              help="A target profile file of your own instead of --target.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("dist"), show_default=True)
@click.option("--formats", default="gguf,onnx", show_default=True,
              help="Formats (gguf, onnx: their default kinds) and/or variant kinds such as gguf-q8_0.")
@click.option("--context", type=int, default=None, help="Context the server allocates (default: model's, max 4096).")
@click.option("--max-ppl-increase", default="5%", show_default=True, help="Gate: perplexity rise allowed.")
@click.option("--max-kld", type=float, default=0.05, show_default=True, help="Gate: mean KL divergence allowed.")
@click.option("--min-task-accuracy", default=None, help="Gate: share of tasks right (e.g. 80% or 0.8).")
@click.option("--tasks", "tasks_file", type=click.Path(path_type=Path), default=None,
              help="JSONL of {prompt|messages, expected, match} for the gate's task accuracy.")
@click.option("--eval-text", type=click.Path(path_type=Path), default=None, help="Evaluation text for the gate.")
@click.option("--prefer", type=click.Choice(["speed", "quality", "size"]), default="speed", show_default=True)
@click.option("--offline-wheels", is_flag=True, help="Carry the target's wheels and an install.sh in the bundle.")
@click.option("--threads", type=int, default=None, help="Threads for measuring here (default: physical cores).")
@click.option("--force", is_flag=True, help="Recompute every stage instead of using the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@handles_errors
def build(model: Path | None, target_name: str | None, profile_file: Path | None, out_dir: Path, formats: str,
          context: int | None, max_ppl_increase: str, max_kld: float, min_task_accuracy: str | None,
          tasks_file: Path | None, eval_text: Path | None, prefer: str, offline_wheels: bool, threads: int | None,
          force: bool, as_json: bool) -> None:
    """Build the best bundle of MODEL (default: the demo student) for a target: convert, check quality, measure
    or predict, select, bundle. Exit 5: no variant passes the gate; exit 6: none fits the memory budget."""
    from edgepack.build import BuildOptions, build as run_build
    from edgepack.demo import resolve_model
    from edgepack.quality.tasks import load_tasks
    from edgepack.targets import resolve_target

    if target_name is not None and profile_file is not None:
        raise EdgepackError("give --target or --profile, not both")
    target = resolve_target(target_name, profile_file)
    gate = _gate(max_ppl_increase, max_kld, min_task_accuracy)
    text = _read_eval_text(eval_text)
    options = BuildOptions(out_dir=out_dir, formats=tuple(f for f in formats.split(",") if f.strip()),
                           context=context, gate=gate, tasks=tuple(load_tasks(tasks_file)) if tasks_file else (),
                           eval_text=text, prefer=prefer, offline_wheels=offline_wheels, force=force,
                           threads=threads)
    result = run_build(resolve_model(model), target, options)
    if as_json:
        _print_json({"bundle": str(result.bundle.directory), "archive": str(result.bundle.archive),
                     "chosen": result.decision.chosen, "decision": to_json_dict(result.decision),
                     "stages": [to_json_dict(s) for s in result.stages], "seconds": result.seconds})
        return
    console = stdout_console()
    table = Table(title=f"{result.target.name}: chosen {result.decision.chosen}")
    for column in ("variant", "gate", "KLD", "PPL ratio", "memory MiB", "decode t/s", "", "verdict"):
        table.add_column(column)
    rejected = {r.name: r for r in result.decision.rejected}
    by_name = {p.variant: p for p in result.performance}
    for q in result.quality.variants:
        p = by_name[q.name]
        verdict = "chosen" if q.name == result.decision.chosen else \
            f"{rejected[q.name].reason}: {rejected[q.name].detail}"
        table.add_row(q.name, "pass" if q.passed else "FAIL", f"{q.kld_mean:.4f}", f"{q.ppl_ratio:.3f}",
                      f"{p.memory_bytes / 2**20:.0f}", "-" if p.decode_tps is None else f"{p.decode_tps:.1f}",
                      "predicted" if p.is_prediction else "measured", verdict)
    console.print(table)
    stages = ", ".join(f"{s.name} {s.seconds:.1f}s ({s.ran} run, {s.cached} cached)" for s in result.stages)
    console.print(f"stages: {stages}; total {result.seconds:.1f}s", highlight=False)
    console.print(f"bundle: {result.bundle.directory}\narchive: {result.bundle.archive}", highlight=False)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@handles_errors
def verify(bundle: Path, as_json: bool) -> None:
    """Check a BUNDLE (directory or .tar.gz): the manifest's schema and every file's size and sha256.
    Exit 7 when it does not check out."""
    from edgepack.verify import verify_bundle

    report = verify_bundle(bundle)
    if as_json:
        _print_json(to_json_dict(report))
        return
    click.echo(f"ok: {report.bundle} ({report.chosen_variant} for {report.target}): {report.files_checked} files, "
               f"{report.bytes_checked / 2**20:.1f} MiB, every sha256 matches the manifest")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--host", default=None, help="Address to listen on (default: the bundle's, else 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: the bundle's, else 8080).")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every /v1 route.")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None, help="Read the API key from a file.")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests that may wait for the engine; past this the answer is 503 with Retry-After.")
@click.option("--threads", type=int, default=None, help="Engine threads (default: the bundle's or physical cores).")
@click.option("--context", type=int, default=None, help="Context to allocate (default: the bundle's).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "metal"]), default=None,
              help="Default: the bundle's (its target's GPU; the CPU where the engine cannot offload), else cpu.")
@click.option("--policy", type=click.Choice(["local", "remote", "auto"]), default=None,
              help="Routing: local only, always upstream, or auto (rules, then the local answer's confidence).")
@click.option("--upstream", "upstream_url", default=None, help="Upstream OpenAI-compatible base URL (…/v1).")
@click.option("--upstream-model", default=None, help="The upstream model's name.")
@click.option("--upstream-key-env", default=None,
              help="Environment variable holding the upstream API key (default EDGEPACK_UPSTREAM_API_KEY).")
@click.option("--upstream-timeout", type=float, default=None, help="Seconds before upstream counts as down (30).")
@click.option("--min-mean-logprob", type=float, default=None, help="auto: below this mean logprob, go upstream.")
@click.option("--min-token-logprob", type=float, default=None, help="auto: a token below this, go upstream.")
@click.option("--route-pattern", "patterns", multiple=True, help="auto: a prompt matching this regex goes upstream.")
@click.option("--router-config", type=click.Path(path_type=Path), default=None,
              help="Router settings file (from `edgepack route calibrate`); options above override it.")
@handles_errors
def serve(path: Path, host: str | None, port: int | None, api_key: str | None, api_key_file: Path | None,
          max_queue: int, threads: int | None, context: int | None, device: str | None, policy: str | None,
          upstream_url: str | None,
          upstream_model: str | None, upstream_key_env: str | None, upstream_timeout: float | None,
          min_mean_logprob: float | None, min_token_logprob: float | None, patterns: tuple[str, ...],
          router_config: Path | None) -> None:
    """Serve a bundle (verified first; one that fails is refused) or a variant over the OpenAI API, optionally
    routing hard requests to an upstream model."""
    from edgepack.local_model import defaults_for
    from edgepack.router import RouterConfig
    from edgepack.server import ServerConfig, serve_path

    overrides = {"policy": policy, "upstream_url": upstream_url, "upstream_model": upstream_model,
                 "key_env": upstream_key_env, "timeout_s": upstream_timeout, "min_mean_logprob": min_mean_logprob,
                 "min_token_logprob": min_token_logprob, "patterns": patterns or None}
    if router_config is not None:
        router = RouterConfig.from_file(router_config, **overrides)
    else:
        router = RouterConfig(**{k: (tuple(v) if k == "patterns" else v) for k, v in overrides.items()
                                 if v is not None})
    router.check_ready()

    if api_key_file is not None:
        if not api_key_file.is_file():
            raise EdgepackError(f"API key file {api_key_file} does not exist")
        api_key = api_key_file.read_text().strip()
        if not api_key:
            raise EdgepackError(f"API key file {api_key_file} is empty")
    if max_queue < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--max-queue")
    defaults = defaults_for(path)
    config = ServerConfig(host=host or defaults.host, port=port if port is not None else defaults.port,
                          api_key=api_key, max_queue=max_queue, router=router)
    STDERR.print(f"serving {defaults.model_id} on http://{config.host}:{config.port}/v1 (loading the model; "
                 "GET /health answers 200 once it is ready)", highlight=False)
    serve_path(defaults, config, threads=threads, context=context, device=device)


@main.group()
def route() -> None:
    """Hybrid routing settings."""


@route.command("calibrate")
@click.argument("prompts_file", type=click.Path(path_type=Path))
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="The bundle or variant the server will run.")
@click.option("--local-share", type=float, default=0.7, show_default=True, help="Share of requests to keep local.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=Path("router.json"),
              show_default=True, help="Router settings file to write the threshold to (created if absent).")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="Tokens of each local answer scored.")
@click.option("--json", "as_json", is_flag=True)
@handles_errors
def route_calibrate(prompts_file: Path, model_path: Path, local_share: float, config_path: Path, max_tokens: int,
                    as_json: bool) -> None:
    """Pick the confidence threshold (mean token log-probability) that keeps --local-share of PROMPTS_FILE
    (JSONL of {"prompt"} or {"messages"}) local, and write it to the router config."""
    from edgepack.local_model import load
    from edgepack.route_calibrate import calibrate, load_prompts, write_threshold

    prompts = load_prompts(prompts_file)
    model = load(model_path)
    try:
        calibration = calibrate(model, prompts, local_share, max_tokens)
    finally:
        model.close()
    write_threshold(config_path, calibration)
    if as_json:
        _print_json({**to_json_dict(calibration), "config": str(config_path)})
        return
    click.echo(f"threshold {calibration.threshold:.4f} (mean token log-probability) keeps "
               f"{calibration.local_share:.0%} of {calibration.prompts} prompts local (asked {local_share:.0%}); "
               f"written to {config_path}")
