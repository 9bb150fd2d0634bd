"""The profiler checked against a direct measurement, and predictions checked against measurements on this host.

    python -m benchmarks.profiler [--model DIR] [--runs 5] [--json]

(1) Decode t/s of each GGUF variant from `edgepack profile` against llama-cpp-python's own generate loop on the
same file, threads, prompt and token count (each in its own process, the two alternating three times).
(2) Every GGUF and ONNX variant is
predicted for `host` from one calibration per engine (the largest variant: gguf-f16, onnx-fp32) and the measured
bandwidth, then compared with its measurement: the error of predicted memory (against the model's RSS) and of
predicted decode t/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

KINDS = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "onnx-fp32", "onnx-int8", "onnx-int4")
CALIBRATE_ON = {"llamacpp": "gguf-f16", "onnxrt": "onnx-fp32"}


def direct_llama_cpp(path: Path, threads: int, prompt_tokens: int, new_tokens: int, runs: int) -> float:
    """Decode t/s from llama-cpp-python's own loop, measured in this process."""
    from benchmarks.common import llama_cpp_generate_timing
    from edgepack.measure.profiler import PROMPT_TEXT
    from runtimes.llamacpp_amx import load_llama

    llm = load_llama(path, n_threads=threads, n_threads_batch=threads,
                n_ctx=prompt_tokens + new_tokens + 8, verbose=False)
    prompt = llm.tokenize(PROMPT_TEXT.encode())[:prompt_tokens]
    llama_cpp_generate_timing(llm, prompt, new_tokens)
    return statistics.median(llama_cpp_generate_timing(llm, prompt, new_tokens)[1] for _ in range(runs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--direct", nargs=2, metavar=("PATH", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.direct:
        print(json.dumps(direct_llama_cpp(Path(args.direct[0]), int(args.direct[1]), args.prompt_tokens,
                                          args.new_tokens, args.runs)))
        return

    from rich.console import Console
    from rich.table import Table

    from benchmarks.runtimes import ensure_variants, variant_path
    from edgepack.core.cache import cache_root
    from edgepack.measure.predict import calibrate, predict
    from edgepack.measure.profiler import ProfileOptions, measure_variant, profile
    from edgepack.measure.targets import host_profile
    from edgepack.student.demo import resolve_model
    from runtimes.base import physical_cores

    console = Console(stderr=True, soft_wrap=True, width=160)
    model = args.model or resolve_model(None)
    root = cache_root() / "bench" / model.name
    ensure_variants(model, root)
    threads = physical_cores()
    paths = {kind: variant_path(root, model, kind) for kind in KINDS}
    console.print("profiling every variant (one process each) ...")
    options = ProfileOptions(threads=threads, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                             runs=args.runs)
    measured = profile(list(paths.values()), options)
    by_kind = dict(zip(KINDS, measured.variants, strict=True))

    agreement = []
    for kind in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m"):
        # alternate the two measurements so that drift of the machine's speed hits both alike
        ours, direct = [], []
        for round_index in range(3):
            console.print(f"{kind}: round {round_index + 1}/3, edgepack's profiler then llama-cpp-python directly")
            ours.append(measure_variant(paths[kind], options).decode_tps)
            out = subprocess.run([sys.executable, "-m", "benchmarks.profiler", "--direct", str(paths[kind]),
                                  str(threads), "--runs", str(args.runs), "--prompt-tokens", str(args.prompt_tokens),
                                  "--new-tokens", str(args.new_tokens)], check=True, capture_output=True, text=True)
            direct.append(float(out.stdout.strip().splitlines()[-1]))
        agreement.append({"variant": kind, "profiler_decode_tps": statistics.median(ours),
                          "direct_decode_tps": statistics.median(direct),
                          "ratio": statistics.median(ours) / statistics.median(direct),
                          "profiler_rounds": ours, "direct_rounds": direct})

    calibrations = {engine: calibrate(by_kind[kind], measured.memory_bandwidth_gbps)
                    for engine, kind in CALIBRATE_ON.items()}
    host = host_profile()
    errors = []
    for kind in KINDS:
        m = by_kind[kind]
        p = predict(paths[kind], m.engine, host, calibrations[m.engine], context=m.context,
                    target_bandwidth_gbps=measured.memory_bandwidth_gbps)
        errors.append({"variant": kind, "engine": m.engine, "calibrated_on": calibrations[m.engine].from_variant,
                       "predicted_memory_mib": p.memory_bytes / 2**20, "measured_memory_mib": m.model_rss_mib,
                       "memory_error_pct": 100 * (p.memory_bytes / 2**20 - m.model_rss_mib) / m.model_rss_mib,
                       "predicted_decode_tps": p.decode_tps, "measured_decode_tps": m.decode_tps,
                       "decode_error_pct": 100 * (p.decode_tps - m.decode_tps) / m.decode_tps})

    table = Table(title=f"(1) profiler vs direct llama-cpp-python decode, {threads} threads, median of 3 alternating "
                        f"rounds (each the median of {args.runs} runs)")
    for column in ("variant", "profiler t/s", "direct t/s", "profiler/direct"):
        table.add_column(column)
    for row in agreement:
        table.add_row(row["variant"], f"{row['profiler_decode_tps']:.1f}", f"{row['direct_decode_tps']:.1f}",
                      f"{row['ratio']:.3f}")
    console.print(table)
    table = Table(title=f"(2) predicted vs measured on this host (bandwidth {measured.memory_bandwidth_gbps:.1f} GB/s "
                        "measured)")
    for column in ("variant", "engine", "calibrated on", "memory MiB pred/meas", "error", "decode t/s pred/meas",
                   "error"):
        table.add_column(column)
    for row in errors:
        table.add_row(row["variant"], row["engine"], row["calibrated_on"],
                      f"{row['predicted_memory_mib']:.0f} / {row['measured_memory_mib']:.0f}",
                      f"{row['memory_error_pct']:+.1f}%",
                      f"{row['predicted_decode_tps']:.1f} / {row['measured_decode_tps']:.1f}",
                      f"{row['decode_error_pct']:+.1f}%")
    console.print(table)
    if args.json:
        print(json.dumps({"bandwidth_gbps": measured.memory_bandwidth_gbps, "agreement": agreement,
                          "predictions": errors}, indent=2))


if __name__ == "__main__":
    main()
