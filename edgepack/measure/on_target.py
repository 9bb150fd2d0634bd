"""What each variant needs and how fast it decodes on the build's target: measured when the target is this
machine, predicted from the target's profile otherwise. Either way it is calibrated on the variant itself
(issue 5 measured that one engine efficiency for all variants overestimates quantized ones by 24-47%)."""

from __future__ import annotations

from edgepack.core.artifacts import Candidate, QualityReport, Variant
from edgepack.measure.predict import KV_BYTES, ModelShape, Prediction, calibrate, kv_cache_bytes, model_shape, predict
from edgepack.measure.profiler import DeviceMeasurements, Measurement
from edgepack.measure.targets import TargetProfile


def performance_on_target(variants: list[Variant], measurements: DeviceMeasurements, target: TargetProfile,
                          context: int, shapes: dict[str, ModelShape] | None = None) -> list[Prediction]:
    """`shapes`: each variant's ModelShape by kind, where already known."""
    by_name = {m.name: m for m in measurements.variants}
    on_host = target.source == "detected"
    out = []
    for v in variants:
        m = by_name[v.kind]
        shape = (shapes or {}).get(v.kind) or model_shape(v.path)
        if on_host:
            out.append(_measured_here(shape, m, target, context))
        else:
            calibration = calibrate(m, measurements.memory_bandwidth_gbps, shape)
            out.append(predict(v.path, m.engine, target, calibration, context, shape=shape))
    return out


def _measured_here(shape: ModelShape, m: Measurement, target: TargetProfile, context: int) -> Prediction:
    """Decode is as measured; memory is the measured model RSS plus the KV cache the longer context adds."""
    kv_bytes = KV_BYTES.get(m.engine, 4)
    extra_kv = max(0, kv_cache_bytes(shape, context, kv_bytes) - kv_cache_bytes(shape, m.context, kv_bytes))
    memory = int(m.model_rss_mib * 2**20) + extra_kv
    basis = (f"measured on this machine: decode {m.decode_tps:.1f} t/s (median of {m.runs} runs, "
             f"{m.decode_tps_min:.1f}-{m.decode_tps_max:.1f}), prefill {m.prefill_tps:.0f} t/s at a "
             f"{m.prompt_tokens}-token prompt, {m.threads} threads; memory = model RSS {m.model_rss_mib:.0f} MiB "
             f"measured at context {m.context} + {extra_kv / 2**20:.0f} MiB of KV cache to reach {context} tokens")
    return Prediction(variant=m.name, target=target.name, engine=m.engine, memory_bytes=memory,
                      fits=memory <= target.memory_budget_gib * 2**30, decode_tps=m.decode_tps,
                      prefill_tps=m.prefill_tps, basis=basis, is_prediction=False)


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
