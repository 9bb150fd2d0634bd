"""The quality report for every variant of the demo student (GGUF f16/q8_0/q4_k_m, ONNX fp32/int8/int4), with
the time and peak memory the evaluation took.

    python -m benchmarks.quality [--model DIR] [--context 512] [--json]

Variants are the ones `python -m benchmarks.runtimes` makes (made here if missing). The evaluation runs as
`edgepack eval` in a fresh process; its wall time and peak RSS are measured from outside. A second run shows
the cost once the reference logits are cached.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import run_measured

KINDS = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "onnx-fp32", "onnx-int8", "onnx-int4")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model directory (default: the demo student)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from benchmarks.runtimes import ensure_variants, variant_path
    from edgepack.core.cache import cache_root

    console = Console(stderr=True, soft_wrap=True)
    if args.model is None:
        code = "from edgepack.student.demo import resolve_model; print(resolve_model(None))"
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        model = Path(out.stdout.strip().splitlines()[-1])
    else:
        model = args.model
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
    for label in ("first run (reference computed)", "second run (reference cached)"):
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
    for label, result in timings.items():
        console.print(f"{label}: {result.wall_s:.1f} s wall, peak RSS {result.peak_rss_mib:.0f} MiB")
    if args.json:
        print(json.dumps({"report": report, "timings": {k: vars(v) for k, v in timings.items()}}, indent=2))


if __name__ == "__main__":
    main()
