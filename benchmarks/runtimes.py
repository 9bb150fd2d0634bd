"""Prefill and decode speed, load time, resident memory and size of every variant on every engine, against the
anchors: llama.cpp's GGUF kinds, optimum's `generate` on optimum-onnx's export of the same model, and
onnxruntime-genai's `Generator` on its own builder's int4 model and on our onnx-int4 folder.

    python -m benchmarks.runtimes [--model DIR] [--prompt-tokens 128] [--new-tokens 64] [--runs 5] [--rounds 3]
                                  [--genai-python PYTHON] [--genai-model DIR] [--json]
    python -m benchmarks.runtimes --paired onnx-int4,gguf-q4_k_m [--runs 5] [--rounds 3] [--json]

Variants of the model (default: the demo student) are made once under the cache (bench/<model>/) with
`edgepack convert`; optimum's export goes to bench/<model>/optimum-fp32. Each (variant, engine) is measured in its
own process with the same thread count: one warm-up, then the median (and min/max) of several runs. Prefill t/s =
prompt tokens / time to the first new token; decode t/s = (new tokens - 1) / the time after it. Optimum's decode
time is t(N new tokens) - t(1 new token). Memory is the peak resident memory less the process's before loading
(onnxruntime-genai's row: its whole peak, less nothing, so it reads high).

`--paired A,B` measures two of our variants in one process per round, loaded side by side and their runs
alternated, and gives the ratio of their decode speeds round by round: this VM's speed drifts by up to 20% between
processes minutes apart, which the table's separate processes feel and a ratio within one process does not.

onnxruntime-genai's rows need a Python with onnxruntime-genai (its builder needs transformers 5, which edgepack's
own environment cannot have): `--genai-python` (default: ~/.cache/edgepack/tools/genai-venv/bin/python when it
exists) runs benchmarks/genai_anchor.py; `--genai-model` is its builder's folder (default bench/<model>/genai-int4,
made with `python -m onnxruntime_genai.models.builder -i MODEL -o DIR -p int4 -e cpu`). Without them those rows
are left out, and the table says so.
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
            "decode_max": m.decode_tps_max, "memory_mib": m.model_rss_mib, "load_s": m.load_s}


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
    before, started = _rss_bytes(), time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(path, use_cache=True, session_options=options)
    load_s = time.perf_counter() - started
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
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**summarize(results), "memory_mib": (peak - before) / 2**20, "load_s": load_s}


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure_genai(python: Path, path: Path, tokenizer: Path, prompt_tokens: int, new_tokens: int, runs: int,
                  threads: int) -> dict:
    """onnxruntime-genai's Generator in its own Python, on the prompt token ids ours reads (the model's own
    tokenizer: the builder's folder has one only transformers 5 loads)."""
    import tempfile

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer)(PROMPT_TEXT)["input_ids"][:prompt_tokens]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(ids, handle)
    script = Path(__file__).with_name("genai_anchor.py")
    out = subprocess.run([str(python), str(script), str(path), "--prompt-tokens", str(prompt_tokens),
                          "--new-tokens", str(new_tokens), "--runs", str(runs), "--threads", str(threads),
                          "--token-ids", handle.name], check=True, capture_output=True, text=True)
    Path(handle.name).unlink()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {key: result[key] for key in ("prefill_tps", "decode_tps", "decode_min", "decode_max", "load_s")} | {
        "memory_mib": result["peak_rss_mib"]}


def ensure_optimum_export(model: Path, root: Path) -> Path:
    from converters.onnx.export import export_onnx_fp32

    out = root / "optimum-fp32"
    if not out.exists():
        export_onnx_fp32(model, out)
    return out


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def combine_rounds(results: list[dict]) -> dict:
    """Rounds of one row, measured interleaved with the other rows (this VM's speed drifts over minutes):
    medians of the rounds' medians, and the extremes of their ranges."""
    def median(key: str) -> float:
        return statistics.median(r[key] for r in results)

    return {"prefill_tps": median("prefill_tps"), "decode_tps": median("decode_tps"),
            "decode_min": min(r["decode_min"] for r in results), "decode_max": max(r["decode_max"] for r in results),
            "memory_mib": median("memory_mib"), "load_s": median("load_s"), "rounds": len(results),
            "decode_by_round": [r["decode_tps"] for r in results]}


def summarize(results: list[tuple[float, float]]) -> dict:
    prefill, decode = [r[0] for r in results], [r[1] for r in results]
    return {"prefill_tps": statistics.median(prefill), "decode_tps": statistics.median(decode),
            "decode_min": min(decode), "decode_max": max(decode)}


def paired_child(args: argparse.Namespace) -> None:
    from edgepack.measure.profiler import measure_alternated_in_this_process

    first, second = measure_alternated_in_this_process(
        [(Path(path), args.threads) for path in args.one_paired], args.prompt_tokens, args.new_tokens, args.runs,
        args.prompt_tokens + args.new_tokens + 8)
    print(json.dumps([{"decode_tps": m.decode_tps, "prefill_tps": m.prefill_tps} for m in (first, second)]))


def paired(args: argparse.Namespace, model: Path, root: Path, console) -> None:
    kinds = args.paired.split(",")
    ours = {kind for kind, engine in VARIANTS if engine != "torch"}
    if len(kinds) != 2 or not set(kinds) <= ours:
        raise SystemExit(f"--paired takes two of {', '.join(sorted(ours))}, comma-separated; got {args.paired!r}")
    paths = [variant_path(root, model, kind) for kind in kinds]
    rounds = []
    for round_index in range(args.rounds):
        console.print(f"round {round_index + 1}/{args.rounds}: {kinds[0]} and {kinds[1]} alternated in one process")
        out = subprocess.run([sys.executable, "-m", "benchmarks.runtimes", "--one-paired", *map(str, paths),
                              "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                              "--runs", str(args.runs), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        rounds.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratios = [a["decode_tps"] / b["decode_tps"] for a, b in rounds]
    for index, ((a, b), ratio) in enumerate(zip(rounds, ratios, strict=True), 1):
        console.print(f"round {index}: {kinds[0]} {a['decode_tps']:.1f} t/s, {kinds[1]} {b['decode_tps']:.1f} t/s, "
                      f"decode ratio {ratio:.3f}; prefill {a['prefill_tps']:.0f} against {b['prefill_tps']:.0f}")
    console.print(f"{kinds[0]} / {kinds[1]} decode, median of {args.rounds} rounds ({args.runs} alternated runs "
                  f"each, {args.threads} threads): {statistics.median(ratios):.3f}x")
    if args.json:
        print(json.dumps({"model": str(model), "threads": args.threads, "variants": kinds, "rounds": rounds,
                          "decode_ratio_by_round": ratios, "decode_ratio": statistics.median(ratios)}, indent=2))


def child(args: argparse.Namespace) -> None:
    path, engine = Path(args.one[0]), args.one[1]
    if engine == "optimum":
        result = measure_optimum(path, args.prompt_tokens, args.new_tokens, args.runs, args.threads)
    elif engine == "genai":
        result = measure_genai(args.genai_python, path, args.model, args.prompt_tokens, args.new_tokens, args.runs,
                               args.threads)
    else:
        result = measure_ours(path, args.prompt_tokens, args.new_tokens, args.runs, args.threads)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model directory (default: the demo student)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="the whole table measured this many times, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="default: one per physical core")
    parser.add_argument("--genai-python", type=Path,
                        default=Path.home() / ".cache/edgepack/tools/genai-venv/bin/python")
    parser.add_argument("--genai-model", type=Path, help="onnxruntime-genai's builder's int4 folder")
    parser.add_argument("--only", help="measure only these rows, e.g. onnx-int4/onnxrt,onnx-int4/genai")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--paired", metavar="A,B", help="two of our variants alternated in one process per round: "
                        "the ratio of their decode speeds")
    parser.add_argument("--one", nargs=2, metavar=("PATH", "ENGINE"), help=argparse.SUPPRESS)
    parser.add_argument("--one-paired", nargs=2, metavar=("PATH_A", "PATH_B"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        from runtimes.base import physical_cores

        args.threads = physical_cores()
    if args.one:
        child(args)
        return
    if args.one_paired:
        paired_child(args)
        return

    from rich.console import Console
    from rich.table import Table

    from edgepack.core.cache import cache_root
    from edgepack.student.demo import resolve_model

    console = Console(stderr=True, soft_wrap=True)
    model = Path(args.model) if args.model else resolve_model(None)
    root = cache_root() / "bench" / model.name
    ensure_variants(model, root)
    if args.paired:
        paired(args, model, root, console)
        return
    paths = {kind: variant_path(root, model, kind) for kind, _ in VARIANTS}
    paths["optimum-fp32"] = ensure_optimum_export(model, root)
    plan = [*VARIANTS, ("optimum-fp32", "optimum")]
    genai_model = args.genai_model or root / "genai-int4"
    notes = []
    if args.genai_python.exists() and genai_model.exists():
        paths["genai-int4"] = genai_model
        plan += [("genai-int4", "genai"), ("onnx-int4", "genai")]
    else:
        notes.append(f"onnxruntime-genai rows left out: no {args.genai_python} or no {genai_model}")
    if args.only:
        wanted = {tuple(item.split("/", 1)) for item in args.only.split(",")}
        plan = [row for row in plan if row in wanted]
    measured: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for kind, engine in plan:
            console.print(f"round {round_index + 1}/{args.rounds}: measuring {kind} on {engine} ...")
            command = [sys.executable, "-m", "benchmarks.runtimes", "--one", str(paths[kind]), engine,
                       "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                       "--runs", str(args.runs), "--threads", str(args.threads),
                       "--genai-python", str(args.genai_python), "--model", str(model)]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
                notes.append(f"{kind} on {engine} failed in round {round_index + 1}: {last}")
                console.print(out.stderr[-2000:])
                continue
            measured.setdefault((kind, engine), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = [{"variant": kind, "engine": engine, "mib": size_mib(paths[kind]), **combine_rounds(results)}
            for (kind, engine), results in measured.items()]

    def decode(kind: str, engine: str) -> float | None:
        row = next((r for r in rows if r["variant"] == kind and r["engine"] == engine), None)
        return row["decode_tps"] if row else None

    def prefill(kind: str, engine: str) -> float | None:
        row = next((r for r in rows if r["variant"] == kind and r["engine"] == engine), None)
        return row["prefill_tps"] if row else None

    pairs = {"onnx-int4 / gguf-q4_k_m decode": (decode, "onnx-int4", "onnxrt", "gguf-q4_k_m", "llamacpp"),
             "onnx-int4 / gguf-q4_k_m prefill": (prefill, "onnx-int4", "onnxrt", "gguf-q4_k_m", "llamacpp"),
             "onnx-int8 / gguf-q8_0 decode": (decode, "onnx-int8", "onnxrt", "gguf-q8_0", "llamacpp"),
             "onnx-fp32 (ours) / optimum generate on optimum's export decode":
                 (decode, "onnx-fp32", "onnxrt", "optimum-fp32", "optimum"),
             "onnx-int4 / genai builder int4 on Generator decode":
                 (decode, "onnx-int4", "onnxrt", "genai-int4", "genai"),
             "our loop / Generator on the same onnx-int4 decode": (decode, "onnx-int4", "onnxrt", "onnx-int4", "genai")}
    ratios = {}
    for name, (figure, kind, engine, anchor_kind, anchor_engine) in pairs.items():
        ours, anchor = figure(kind, engine), figure(anchor_kind, anchor_engine)
        if ours and anchor:
            ratios[name] = ours / anchor
    table = Table(title=f"{model.name}: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
                        f"{args.threads} threads, median of {args.runs} runs in each of {args.rounds} interleaved "
                        "rounds, each a fresh process")
    for column in ("variant", "engine", "MiB", "load s", "memory MiB", "prefill t/s", "decode t/s", "decode min-max"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["variant"], r["engine"], f"{r['mib']:.0f}", f"{r['load_s']:.2f}", f"{r['memory_mib']:.0f}",
                      f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.1f}",
                      f"{r['decode_min']:.1f}-{r['decode_max']:.1f}")
    console.print(table)
    for name, value in ratios.items():
        console.print(f"{name}: {value:.2f}x")
    for note in notes:
        console.print(note)
    if args.json:
        print(json.dumps({"model": str(model), "threads": args.threads, "rows": rows, "ratios": ratios,
                          "notes": notes}, indent=2))


if __name__ == "__main__":
    main()
