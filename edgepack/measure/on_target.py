"""What each variant needs and how fast it decodes on the build's target: measured when the target is this machine
or a device measured over SSH, predicted from the target's profile otherwise (with the error the prediction model
made on figures of this machine it was not fitted on)."""

from __future__ import annotations

from dataclasses import dataclass

from edgepack.core.artifacts import Candidate, QualityReport, Variant
from edgepack.measure.predict import (
    EngineFit,
    ModelShape,
    Prediction,
    engine_kv_bytes,
    fit_engine,
    predict,
    predict_decode_tps,
    predict_memory_bytes,
)
from edgepack.measure.profiler import DeviceMeasurements, Measurement
from edgepack.measure.targets import TargetProfile

MIN_SECOND_CONTEXT = 256


@dataclass(frozen=True)
class FitRun:
    """One extra measurement a prediction needs: a variant at another thread count or context."""

    kind: str
    threads: int
    context: int
    # "fit": measured on its own; "pair": measured in one process with the variant at the build's thread count, the
    # runs alternated (profiler.measure_thread_pair), both figures then fitted; "check": held out
    purpose: str


def fit_runs(variants: list[Variant], engines: dict[str, str], threads: int, context: int) -> list[FitRun]:
    """Per engine: its largest and smallest variants at one thread, each paired with the build's thread count (how
    decode scales with threads tells the bandwidth share from compute), the largest at a quarter of the context (the
    compute buffers), and a variant between them at both (held out: the check of the fitted model). With two
    variants, the smallest is the check."""
    runs = []
    other_threads = 1 if threads > 1 else None
    other_context = max(MIN_SECOND_CONTEXT, context // 4) if context > MIN_SECOND_CONTEXT else None
    for engine in sorted(set(engines.values())):
        mine = sorted((v for v in variants if engines[v.kind] == engine), key=lambda v: v.bytes)
        largest = mine[-1]
        fitted = [largest, mine[0]] if len(mine) >= 3 else [largest]
        check = mine[len(mine) // 2] if len(mine) >= 3 else mine[0] if len(mine) == 2 else None
        if other_threads:
            runs += [FitRun(v.kind, other_threads, context, "pair") for v in fitted]
        if other_context:
            runs.append(FitRun(largest.kind, threads, other_context, "fit"))
        if check is not None:
            runs.append(FitRun(check.kind, other_threads or threads, other_context or context, "check"))
    return runs


def fit_engines(main: list[Measurement], extra: list[tuple[FitRun, Measurement]], shapes: dict[str, ModelShape],
                bandwidth_gbps: dict[int, float]) -> dict[str, EngineFit]:
    """Each engine's fit, with its held-out error from the check runs. `extra` holds both measurements of each pair
    (one at the build's thread count, one at the other); a paired variant is fitted on those two, not on its main
    measurement, which came from another process, at another moment of the machine's speed."""
    paired = {run.kind for run, _ in extra if run.purpose == "pair"}
    decode_points = [*(m for m in main if m.name not in paired),
                     *(m for run, m in extra
                       if run.purpose == "pair" or (run.purpose == "fit" and run.kind not in paired))]
    # memory from processes that held one runtime each, as every main measurement does
    memory_points = [*main, *(m for run, m in extra if run.purpose == "fit")]
    fits = {}
    by_name = {m.name: m for m in main}
    threads_main = main[0].threads if main else 1
    for engine in sorted({m.engine for m in main}):
        fit = fit_engine(engine, decode_points, shapes, bandwidth_gbps, memory_points=memory_points)
        decode_errors, memory_errors = [], []
        for run, held in extra:
            if run.purpose != "check" or held.engine != engine:
                continue
            m = by_name[run.kind]
            decode = predict_decode_tps(m, shapes[run.kind], fit, held.threads, bandwidth_gbps[held.threads],
                                        bandwidth_gbps[threads_main])
            memory = predict_memory_bytes(m, shapes[run.kind], fit, held.context,
                                          tokens_held=held.prompt_tokens + held.new_tokens)
            decode_errors.append(abs(decode / held.decode_tps - 1))
            memory_errors.append(abs(memory / (held.model_rss_mib * 2**20) - 1))
        if decode_errors:
            fit = EngineFit(engine=fit.engine, bandwidth_share=fit.bandwidth_share,
                            memory_per_context_token=fit.memory_per_context_token,
                            basis=fit.basis + "; checked on " + ", ".join(
                                f"{run.kind} at {m.threads} threads and context {m.context}"
                                for run, m in extra if run.purpose == "check" and m.engine == engine),
                            decode_error=max(decode_errors), memory_error=max(memory_errors))
        fits[engine] = fit
    return fits


def performance_on_target(variants: list[Variant], measurements: DeviceMeasurements, target: TargetProfile,
                          context: int, shapes: dict[str, ModelShape], fits: dict[str, EngineFit],
                          on_device: DeviceMeasurements | None = None) -> list[Prediction]:
    """`measurements`: this machine's, at `context`; `on_device`: the target device's, measured over SSH."""
    here = {m.name: m for m in measurements.variants}
    there = {m.name: m for m in on_device.variants} if on_device else {}
    out = []
    for v in variants:
        m, shape = here[v.kind], shapes[v.kind]
        fit = fits.get(m.engine) or fit_engine(m.engine, [], shapes, {})
        if v.kind in there:
            predicted = predict(m, shape, fit, measurements.memory_bandwidth_gbps, target, context)
            out.append(_measured(there[v.kind], shape, fit, target, context, on_device, predicted))
        elif target.source == "detected":
            out.append(_measured(m, shape, fit, target, context, measurements, None))
        else:
            out.append(predict(m, shape, fit, measurements.memory_bandwidth_gbps, target, context))
    return out


def _measured(m: Measurement, shape: ModelShape, fit: EngineFit, target: TargetProfile, context: int,
              where: DeviceMeasurements, predicted: Prediction | None) -> Prediction:
    """Decode as measured; memory as measured at `context`, plus the KV cache of a full context where the engine
    grows its cache with the tokens held (ONNX Runtime)."""
    memory = predict_memory_bytes(m, shape, fit, context)
    place = f"{where.device_description} over SSH ({where.measured_on})" if where.measured_on else "this machine"
    if m.device != "cpu":
        place += f"'s {m.device} GPU"
    grown = memory - int(m.model_rss_mib * 2**20)
    basis = (f"measured on {place}: decode {m.decode_tps:.1f} t/s (median of {m.runs} runs, "
             f"{m.decode_tps_min:.1f}-{m.decode_tps_max:.1f}), prefill {m.prefill_tps:.0f} t/s at a "
             f"{m.prompt_tokens}-token prompt, {m.threads} threads; memory = model RSS {m.model_rss_mib:.0f} MiB "
             f"measured at context {m.context}"
             + (f" + {grown / 2**20:.0f} MiB of KV cache for a full {context}-token context "
                f"({engine_kv_bytes(shape, m.engine, context) / 2**20:.0f} MiB in all)" if grown > 0 else ""))
    if m.joules_per_token is not None:
        basis += f"; {m.joules_per_token:.3f} J per decoded token ({m.power_source})"
    if predicted is not None:
        basis += (f"; this machine's model predicted {_tps(predicted.decode_tps)} t/s and "
                  f"{predicted.memory_bytes / 2**20:.0f} MiB")
    return Prediction(variant=m.name, target=target.name, engine=m.engine, memory_bytes=memory,
                      fits=memory <= target.memory_budget_gib * 2**30, decode_tps=m.decode_tps,
                      prefill_tps=m.prefill_tps, basis=basis, is_prediction=False,
                      predicted_decode_tps=predicted.decode_tps if predicted else None,
                      predicted_memory_bytes=predicted.memory_bytes if predicted else None,
                      decode_error=predicted.decode_error if predicted else None,
                      memory_error=predicted.memory_error if predicted else None)


def _tps(value: float | None) -> str:
    return "no figure" if value is None else f"{value:.1f}"


def candidates(variants: list[Variant], quality: QualityReport, performance: list[Prediction]) -> list[Candidate]:
    by_quality = {q.name: q for q in quality.variants}
    by_perf = {p.variant: p for p in performance}
    out = []
    for v in variants:
        q, p = by_quality[v.kind], by_perf[v.kind]
        out.append(Candidate(name=v.kind, bytes=v.bytes, passed_gate=q.passed, gate_reasons=q.reasons,
                             kld_mean=q.kld_mean, ppl_ratio=q.ppl_ratio, memory_bytes=p.memory_bytes,
                             decode_tps=p.decode_tps, measured=not p.is_prediction))
    return out
