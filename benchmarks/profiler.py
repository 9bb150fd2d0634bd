"""Predictions checked against measurements they were not fitted on, on this machine.

    python -m benchmarks.profiler [--model DIR] [--engine llamacpp|onnxrt] [--runs 2] [--rounds 3] [--agreement]
                                  [--json]

Fitted as `edgepack build` fits for a target it is not on (edgepack/measure/on_target.py's fit_engines): every GGUF
and ONNX variant at 2 threads and a 1024-token context, each in its own process (the measurement a prediction starts
from); per engine its largest and smallest variants (gguf-f16 and gguf-q4_k_m, onnx-fp32 and onnx-int4) at 2 and 1
threads in one process, their runs alternated (how decode scales with threads: the share of the read bandwidth decode
reaches, and how compute scales); and the largest at a 256-token context (the compute buffers' growth with the
context). Held out: every variant at 1 and 2 threads and contexts 512 and 4096, each measured in its own process and
predicted from its 2-thread measurement alone (gguf-q8_0 and onnx-int8 at 1 thread are also held out in their thread
count). Every configuration is measured once per round, and its median over the rounds taken.
The table gives each held-out figure's error; `edgepack build` states errors measured the same way beside its
predictions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

KINDS = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "onnx-fp32", "onnx-int8", "onnx-int4")
CALIBRATE_ON = {"llamacpp": "gguf-f16", "onnxrt": "onnx-fp32"}  # the largest of each engine
SMALLEST = {"llamacpp": "gguf-q4_k_m", "onnxrt": "onnx-int4"}
ENGINE_PREFIX = {"llamacpp": "gguf-", "onnxrt": "onnx-"}
FIT_THREADS, FIT_CONTEXT, SECOND_CONTEXT = 2, 1024, 256
PAIRED = 0  # in a configuration: at FIT_THREADS and at 1 thread in one process, the runs alternated
HELD_OUT = [(threads, context) for threads in (1, 2) for context in (512, 4096)]


def dataclass_dict(m) -> dict:
    from dataclasses import asdict

    data = asdict(m)
    data["path"] = str(data["path"])
    return data


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


def agreement(paths: dict[str, Path], options, args, console) -> list[dict]:
    from edgepack.measure.profiler import measure_variant

    rows = []
    for kind in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m"):
        # alternate the two measurements so that drift of the machine's speed hits both alike
        ours, direct = [], []
        for round_index in range(3):
            console.print(f"{kind}: round {round_index + 1}/3, edgepack's profiler then llama-cpp-python directly")
            ours.append(measure_variant(paths[kind], options).decode_tps)
            out = subprocess.run([sys.executable, "-m", "benchmarks.profiler", "--direct", str(paths[kind]),
                                  str(options.threads), "--runs", str(args.runs), "--prompt-tokens",
                                  str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)], check=True,
                                 capture_output=True, text=True)
            direct.append(float(out.stdout.strip().splitlines()[-1]))
        rows.append({"variant": kind, "profiler_decode_tps": statistics.median(ours),
                     "direct_decode_tps": statistics.median(direct),
                     "ratio": statistics.median(ours) / statistics.median(direct)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--engine", choices=sorted(CALIBRATE_ON), help="only this engine's variants (half the time)")
    parser.add_argument("--runs", type=int, default=2, help="measured runs per process, after a warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="processes per configuration, in rounds")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--agreement", action="store_true")
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
    from edgepack.measure.bandwidth import measure_bandwidth_gbps
    from edgepack.measure.on_target import FitRun, fit_engines
    from edgepack.measure.predict import model_shape, predict_decode_tps, predict_memory_bytes
    from edgepack.measure.profiler import ProfileOptions, measure_thread_pair, measure_variant
    from edgepack.student.demo import resolve_model

    console = Console(stderr=True, soft_wrap=True, width=160)
    model = args.model or resolve_model(None)
    root = cache_root() / "bench" / model.name
    ensure_variants(model, root)
    kinds = [kind for kind in KINDS if args.engine is None or kind.startswith(ENGINE_PREFIX[args.engine])]
    engines = [engine for engine in CALIBRATE_ON if args.engine in (None, engine)]
    paths = {kind: variant_path(root, model, kind) for kind in kinds}
    shapes = {kind: model_shape(path) for kind, path in paths.items()}
    base = ProfileOptions(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                          show_progress=False)

    fit_configs = [(kind, FIT_THREADS, FIT_CONTEXT) for kind in kinds]
    pair_configs = [(kind, PAIRED, FIT_CONTEXT) for engine in engines
                    for kind in (CALIBRATE_ON[engine], SMALLEST[engine])]
    context_configs = [(CALIBRATE_ON[engine], FIT_THREADS, SECOND_CONTEXT) for engine in engines]
    held_configs = [(kind, threads, context) for kind in kinds for threads, context in HELD_OUT]
    # every configuration once per round, in rounds: a drift of the machine's speed over the run (seen here: +20%
    # for the same configuration twenty minutes later) then hits the fitted and the held-out figures alike
    results: dict[tuple, list] = {}
    configs = [*fit_configs, *pair_configs, *context_configs, *held_configs]
    bandwidth_rounds: dict[int, list[float]] = {1: [], 2: []}
    for round_index in range(args.rounds):
        for threads in bandwidth_rounds:  # the bandwidth too, once a round
            bandwidth_rounds[threads].append(measure_bandwidth_gbps(threads))
        console.print(f"round {round_index + 1}: read bandwidth {bandwidth_rounds[1][-1]:.1f} GB/s at 1 thread, "
                      f"{bandwidth_rounds[2][-1]:.1f} at 2")
        for number, (kind, threads, context) in enumerate(configs, 1):
            how = f"{FIT_THREADS} and 1 threads alternated" if threads == PAIRED else f"{threads} threads"
            console.print(f"round {round_index + 1}/{args.rounds}, {number}/{len(configs)}: {kind} at {how}, "
                          f"context {context}")
            options = replace(base, threads=FIT_THREADS if threads == PAIRED else threads, context=context)
            made = measure_thread_pair(paths[kind], options, 1) if threads == PAIRED \
                else (measure_variant(paths[kind], options),)
            for m in made:
                key = (kind, f"paired at {m.threads}" if threads == PAIRED else threads, context)
                results.setdefault(key, []).append(replace(m, name=kind))

    def median_of(config: tuple):
        """The round whose decode is the median, with the median model RSS."""
        runs = sorted(results[config], key=lambda m: m.decode_tps)
        middle = runs[(len(runs) - 1) // 2]
        return replace(middle, model_rss_mib=statistics.median(m.model_rss_mib for m in runs))

    bandwidth = {threads: statistics.median(values) for threads, values in bandwidth_rounds.items()}
    fitted = {kind: median_of((kind, FIT_THREADS, FIT_CONTEXT)) for kind in kinds}
    extra = [(FitRun(kind, threads, context, "pair"), median_of((kind, f"paired at {threads}", context)))
             for kind, _, context in pair_configs for threads in (FIT_THREADS, 1)]
    extra += [(FitRun(kind, threads, context, "fit"), median_of((kind, threads, context)))
              for kind, threads, context in context_configs]
    fits = fit_engines(list(fitted.values()), extra, shapes, bandwidth)
    rows = []
    for kind in kinds:
        m = fitted[kind]
        fit = fits[m.engine]
        for threads, context in HELD_OUT:
            held = median_of((kind, threads, context))
            decode = predict_decode_tps(m, shapes[kind], fit, threads, bandwidth[threads], bandwidth[FIT_THREADS])
            memory = predict_memory_bytes(m, shapes[kind], fit, context,
                                          tokens_held=held.prompt_tokens + held.new_tokens) / 2**20
            rows.append({"variant": kind, "engine": m.engine, "threads": threads, "context": context,
                         "thread_count_in_fit": threads == FIT_THREADS or kind in (*CALIBRATE_ON.values(),
                                                                                   *SMALLEST.values()),
                         "measured": dataclass_dict(held),
                         "predicted_decode_tps": decode, "measured_decode_tps": held.decode_tps,
                         "decode_error": decode / held.decode_tps - 1, "predicted_memory_mib": memory,
                         "measured_memory_mib": held.model_rss_mib,
                         "memory_error": memory / held.model_rss_mib - 1})

    table = Table(title=f"held-out predictions on this machine (read bandwidth {bandwidth[1]:.1f} / "
                        f"{bandwidth[2]:.1f} GB/s at 1 / 2 threads; fitted at {FIT_THREADS} threads, context "
                        f"{FIT_CONTEXT})")
    for column in ("variant", "threads", "context", "decode t/s pred / meas", "error", "memory MiB pred / meas",
                   "error"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["variant"], f"{r['threads']}{'' if r['thread_count_in_fit'] else ' (held out)'}",
                      str(r["context"]),
                      f"{r['predicted_decode_tps']:.1f} / {r['measured_decode_tps']:.1f}", f"{r['decode_error']:+.1%}",
                      f"{r['predicted_memory_mib']:.0f} / {r['measured_memory_mib']:.0f}",
                      f"{r['memory_error']:+.1%}")
    console.print(table)
    for engine, fit in fits.items():
        console.print(f"{engine}: {fit.basis}")
    worst_decode = max(abs(r["decode_error"]) for r in rows)
    worst_memory = max(abs(r["memory_error"]) for r in rows)
    console.print(f"largest held-out error: decode {worst_decode:.1%}, memory {worst_memory:.1%}")
    result = {"bandwidth_gbps": bandwidth, "fits": {e: f.basis for e, f in fits.items()},
              "fit_measurements": [dataclass_dict(m) for m in [*fitted.values(), *(m for _, m in extra)]],
              "held_out": rows,
              "worst_decode_error": worst_decode, "worst_memory_error": worst_memory}
    if args.agreement and "llamacpp" in engines:
        result["agreement"] = agreement(paths, replace(base, threads=FIT_THREADS), args, console)
        for row in result["agreement"]:
            console.print(f"{row['variant']}: profiler {row['profiler_decode_tps']:.1f} t/s, llama-cpp-python "
                          f"{row['direct_decode_tps']:.1f} t/s, ratio {row['ratio']:.3f}")
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
