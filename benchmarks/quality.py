"""The quality report for every variant of the demo student (GGUF f16/q8_0/q4_k_m, ONNX fp32/int8/int4), with
the time and peak memory the evaluation took.

    python -m benchmarks.quality [--model DIR] [--context 512] [--cross-check] [--json]

Variants are the ones `python -m benchmarks.runtimes` makes (made here if missing). The evaluation runs as
`edgepack eval` in a fresh process; its wall time and peak RSS are measured from outside. A second run shows
the cost once the reference logits are cached.

`--cross-check` also runs llama.cpp's own `llama-perplexity --kl-divergence` (built by benchmarks.llama_tools from the
llama.cpp inside the installed llama-cpp-python's sources) on the same text and context, for the quantized GGUF
variants against gguf-f16 as its base, and prints its KLD and PPL ratio beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import resolve_demo_model, run_measured

KINDS = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "onnx-fp32", "onnx-int8", "onnx-int4")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model directory (default: the demo student)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--cross-check", action="store_true", help="also run llama.cpp's llama-perplexity")
    parser.add_argument("--runs", type=int, default=2, help="1: only the first run (reference computed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from benchmarks.runtimes import ensure_variants, variant_path
    from edgepack.core.cache import cache_root

    console = Console(stderr=True, soft_wrap=True)
    model = args.model or resolve_demo_model()
    root = cache_root() / "bench" / model.name
    ensure_variants(model, root)
    with_cache_dir = root / "quality-cache"  # a cache of our own, so the first run really computes the reference
    report_file = root / "quality.json"
    variants = [str(variant_path(root, model, kind)) for kind in KINDS]
    command = [sys.executable, "-m", "edgepack", "eval", str(model), *variants, "--context", str(args.context),
               "--json"]
    env = {**os.environ, "EDGEPACK_CACHE": str(with_cache_dir)}
    if with_cache_dir.exists():
        shutil.rmtree(with_cache_dir)
    timings = {}
    for label in ("first run (reference computed)", "second run (reference cached)")[:args.runs]:
        console.print(f"evaluating: {label} ...")
        with open(report_file, "w") as handle:
            result = run_measured(command, env=env, stdout=handle)
        timings[label] = result
    report = json.loads(report_file.read_text())

    table = Table(title=f"quality of {model.name} variants (reference perplexity {report['reference_perplexity']:.3f}, "
                        f"{report['positions_scored']} positions, window {report['window']})")
    for column in ("variant", "engine", "PPL", "PPL ratio [95%]", "KLD mean [95%]", "KLD p99", "same top-1",
                   "RMS Δp", "gate", "eval s"):
        table.add_column(column)
    for v in report["variants"]:
        low, high = v["ppl_ratio_ci"]
        kld_low, kld_high = v["kld_mean_ci"]
        table.add_row(v["name"], v["engine"], f"{v['perplexity']:.3f}",
                      f"{v['ppl_ratio']:.4f} [{low:.4f}, {high:.4f}]",
                      f"{v['kld_mean']:.5f} [{kld_low:.5f}, {kld_high:.5f}]", f"{v['kld_p99']:.4f}",
                      f"{v['same_top1']:.1%}",
                      f"{v['rms_delta_p']:.4f}", "pass" if v["passed"] else "FAIL", f"{v['seconds']:.1f}")
    console.print(table)
    answers = Table(title=f"answers to {report['behaviour_prompts']} behaviour prompts (reference right on "
                          f"{report['reference_behaviour_correct']} of {report['behaviour_checkable']})")
    for column in ("variant", "same answer", "right", "lost / gained", "McNemar p", "answer KLD [95%]",
                   "answer top-1"):
        answers.add_column(column)
    for v in report["variants"]:
        if (b := v.get("behaviour")) is not None:
            answers.add_row(v["name"], f"{b['identical']}/{b['prompts']}", f"{b['correct']}/{b['checkable']}",
                            f"{b['only_reference_correct']} / {b['only_variant_correct']}", f"{b['mcnemar_p']:.3g}",
                            f"{b['answer_kld_mean']:.4f} [{b['answer_kld_ci'][0]:.4f}, {b['answer_kld_ci'][1]:.4f}]",
                            f"{b['answer_same_top1']:.1%}")
    console.print(answers)
    for label, result in timings.items():
        console.print(f"{label}: {result.wall_s:.1f} s wall, peak RSS {result.peak_rss_mib:.0f} MiB")
    checks = cross_check(root, model, report, args.context, console) if args.cross_check else None
    if args.json:
        print(json.dumps({"report": report, "timings": {k: vars(v) for k, v in timings.items()},
                          "llama_perplexity": checks}, indent=2))


def _llama_perplexity(tool: Path, model: Path, text: Path, context: int, base: Path, compare: bool) -> str:
    from runtimes.llamacpp_amx import use_extra_buffers_here

    command = [str(tool), "-m", str(model), "-f", str(text), "-c", str(context), "-t", "2",
               "--kl-divergence-base", str(base), *(["--kl-divergence"] if compare else []),
               *([] if use_extra_buffers_here() else ["--no-repack"])]  # as our runtime loads it on AMX CPUs
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def _figure(pattern: str, output: str) -> tuple[float, float]:
    found = re.search(pattern + r"\s*:\s*([-\d.]+)\s*±\s*([-\d.]+)", output)
    if found is None:
        raise RuntimeError(f"llama-perplexity printed no {pattern!r}:\n{output[-2000:]}")
    return float(found.group(1)), float(found.group(2))


def cross_check(root: Path, model: Path, report: dict, context: int, console) -> dict:
    """llama-perplexity's KLD and PPL ratio for the quantized GGUF variants, on the built-in text, beside ours."""
    from rich.table import Table

    from benchmarks.llama_tools import tools_dir
    from benchmarks.runtimes import variant_path
    from edgepack.quality.reference import DEFAULT_EVAL_TEXT

    console.print("llama.cpp tools: building or finding them ...")
    tool = tools_dir() / "llama-perplexity"
    base = root / "llama-perplexity-base.kld"
    _llama_perplexity(tool, variant_path(root, model, "gguf-f16"), DEFAULT_EVAL_TEXT, context, base, compare=False)
    ours = {v["name"]: v for v in report["variants"]}
    table = Table(title=f"ours vs llama-perplexity --kl-divergence (base gguf-f16, context {context})")
    for column in ("variant", "KLD ours", "KLD llama.cpp", "ours / llama.cpp", "PPL ratio ours",
                   "PPL ratio llama.cpp", "ours / llama.cpp"):
        table.add_column(column)
    results = {}
    for kind in ("gguf-q8_0", "gguf-q4_k_m"):
        output = _llama_perplexity(tool, variant_path(root, model, kind), DEFAULT_EVAL_TEXT, context, base, True)
        kld, kld_error = _figure(r"Mean\s+KLD", output)
        ratio, ratio_error = _figure(r"Mean PPL\(Q\)/PPL\(base\)", output)
        mine = ours[f"{kind}.gguf"] if f"{kind}.gguf" in ours else ours[kind]
        results[kind] = {"kld": kld, "kld_error": kld_error, "ppl_ratio": ratio, "ppl_ratio_error": ratio_error,
                         "ours_kld": mine["kld_mean"], "ours_ppl_ratio": mine["ppl_ratio"]}
        table.add_row(kind, f"{mine['kld_mean']:.4f}", f"{kld:.4f} ± {kld_error:.4f}", f"{mine['kld_mean'] / kld:.3f}",
                      f"{mine['ppl_ratio']:.4f}", f"{ratio:.4f} ± {ratio_error:.4f}",
                      f"{(mine['ppl_ratio'] - 1) / (ratio - 1):.3f} (of the rise)")
    console.print(table)
    return results


if __name__ == "__main__":
    main()
