"""Prefill and decode speed of every variant on every engine, and our ONNX loop against optimum's.

    python -m benchmarks.runtimes [--model DIR] [--prompt-tokens 128] [--new-tokens 64] [--runs 5] [--json]

Variants of the model (default: the demo student) are made once under the cache (bench/<model>/) with
`edgepack convert`. Each (variant, engine) is measured in its own process with the same thread count: one
warm-up, then the median (and min/max) of several runs. Prefill t/s = prompt tokens / time to the first new
token; decode t/s = (new tokens - 1) / the time after it. Optimum's `ORTModelForCausalLM.generate` runs on the
same ONNX files; its decode time is t(N new tokens) - t(1 new token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgepack.measure.profiler import PROMPT_TEXT

VARIANTS = [("gguf-f16", "llamacpp"), ("gguf-q8_0", "llamacpp"), ("gguf-q4_k_m", "llamacpp"),
            ("onnx-fp32", "onnxrt"), ("onnx-int8", "onnxrt"), ("onnx-int4", "onnxrt"), ("hf", "torch")]


def variant_path(root: Path, model: Path, kind: str) -> Path:
    if kind == "hf":
        return model
    return root / (f"{kind}.gguf" if kind.startswith("gguf-") else kind)


def ensure_variants(model: Path, root: Path) -> None:
    missing = [kind for kind, _ in VARIANTS if kind != "hf" and not variant_path(root, model, kind).exists()]
    if missing:
        subprocess.run([sys.executable, "-m", "edgepack", "convert", str(model), "--to", ",".join(missing),
                        "--out", str(root)], check=True, stdout=sys.stderr)  # stdout is for --json


def measure_ours(path: Path, prompt_tokens: int, new_tokens: int, runs: int, threads: int) -> dict:
    """Our runtimes, measured the way `edgepack profile` measures (warm-up, then the median of `runs`)."""
    from edgepack.measure.profiler import measure_in_this_process

    m = measure_in_this_process(path, threads, prompt_tokens, new_tokens, runs, prompt_tokens + new_tokens + 8)
    return {"prefill_tps": m.prefill_tps, "decode_tps": m.decode_tps, "decode_min": m.decode_tps_min,
            "decode_max": m.decode_tps_max, "memory_mib": m.engine_memory_mib}


def measure_optimum(path: Path, prompt_tokens: int, new_tokens: int, runs: int, threads: int) -> dict:
    import warnings

    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(path, use_cache=True, session_options=options)
    prompt = AutoTokenizer.from_pretrained(path)(PROMPT_TEXT)["input_ids"][:prompt_tokens]
    inputs = torch.tensor([prompt])
    mask = torch.ones_like(inputs)

    def timed(count: int) -> float:
        start = time.perf_counter()
        model.generate(inputs, attention_mask=mask, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                       pad_token_id=0)
        return time.perf_counter() - start

    timed(2)  # warm-up
    results = []
    for _ in range(runs):
        first, full = timed(1), timed(new_tokens)
        results.append((prompt_tokens / first, (new_tokens - 1) / (full - first)))
    return summarize(results)


def summarize(results: list[tuple[float, float]]) -> dict:
    prefill, decode = [r[0] for r in results], [r[1] for r in results]
    return {"prefill_tps": statistics.median(prefill), "decode_tps": statistics.median(decode),
            "decode_min": min(decode), "decode_max": max(decode)}


def child(args: argparse.Namespace) -> None:
    path, engine = Path(args.one[0]), args.one[1]
    if engine == "optimum":
        result = measure_optimum(path, args.prompt_tokens, args.new_tokens, args.runs, args.threads)
    else:
        result = measure_ours(path, args.prompt_tokens, args.new_tokens, args.runs, args.threads)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model directory (default: the demo student)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: one per physical core")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("PATH", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        from runtimes.base import physical_cores

        args.threads = physical_cores()
    if args.one:
        child(args)
        return

    from rich.console import Console
    from rich.table import Table

    from edgepack.core.cache import cache_root
    from edgepack.student.demo import resolve_model

    console = Console(stderr=True, soft_wrap=True)
    model = Path(args.model) if args.model else resolve_model(None)
    root = cache_root() / "bench" / model.name
    ensure_variants(model, root)
    plan = [(kind, engine) for kind, engine in VARIANTS] + [
        (kind, "optimum") for kind in ("onnx-fp32", "onnx-int8", "onnx-int4")]
    rows = []
    for kind, engine in plan:
        console.print(f"measuring {kind} on {engine} ...")
        command = [sys.executable, "-m", "benchmarks.runtimes", "--one", str(variant_path(root, model, kind)), engine,
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                   "--runs", str(args.runs), "--threads", str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        rows.append({"variant": kind, "engine": engine, **json.loads(out.stdout.strip().splitlines()[-1])})

    def find(kind: str, engine: str) -> dict:
        return next(r for r in rows if r["variant"] == kind and r["engine"] == engine)

    ratios = {f"ours/optimum decode {kind}": find(kind, "onnxrt")["decode_tps"] / find(kind, "optimum")["decode_tps"]
              for kind in ("onnx-fp32", "onnx-int8", "onnx-int4")}
    ratios["onnx-int8/onnx-fp32 decode"] = find("onnx-int8", "onnxrt")["decode_tps"] / find("onnx-fp32", "onnxrt")[
        "decode_tps"]
    table = Table(title=f"{model.name}: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
                        f"{args.threads} threads, median of {args.runs}")
    for column in ("variant", "engine", "prefill t/s", "decode t/s", "decode min-max", "memory MiB"):
        table.add_column(column)
    for r in rows:
        memory = f"{r['memory_mib']:.0f}" if "memory_mib" in r else "-"
        table.add_row(r["variant"], r["engine"], f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.1f}",
                      f"{r['decode_min']:.1f}-{r['decode_max']:.1f}", memory)
    console.print(table)
    for name, value in ratios.items():
        console.print(f"{name}: {value:.2f}x")
    if args.json:
        print(json.dumps({"model": str(model), "threads": args.threads, "rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
