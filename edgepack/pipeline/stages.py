"""The build's stages, each cached per variant in the StageCache: convert, quality, measure.

Every function returns the same typed artifacts the stage modules return; what was cached and what was run is
reported through `StageRun`, so the build can say it and time it.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from converters.registry import ConvertOptions, converter_for
from edgepack.convert.stage import convert
from edgepack.core.artifacts import BehaviourQuality, QualityReport, Variant, VariantQuality
from edgepack.core.errors import EngineCrashedError
from edgepack.core.file_lock import held_scratch_dir, remove_abandoned_scratch_dirs
from edgepack.core.progress import say
from edgepack.core.versions import library_versions
from edgepack.measure.predict import EngineFit, ModelShape, model_shape
from edgepack.measure.profiler import (
    DeviceMeasurements,
    Measurement,
    ProfileOptions,
    crashed_variant,
    measure_thread_pair,
    measure_variant,
    power_notes,
)
from edgepack.pipeline.stage_cache import StageCache, digest_of
from edgepack.quality.evaluate import EvalOptions

CONVERT_LIBRARIES = ("gguf", "llama-cpp-python", "transformers", "torch", "tokenizers", "optimum-onnx",
                     "onnxruntime", "onnx")
QUALITY_LIBRARIES = ("llama-cpp-python", "onnxruntime", "transformers", "torch", "numpy")
MEASURE_LIBRARIES = ("llama-cpp-python", "onnxruntime")
WORK_PREFIX = ".work-"  # scratch directories of conversions in progress, in the convert stage's folder


@dataclass(frozen=True)
class StageInput:
    """What every cached stage works from: the cache, the student model and its content fingerprint."""

    cache: StageCache
    model: Path
    fingerprint: str
    force: bool = False  # recompute instead of reading the cache


@dataclass(frozen=True)
class StageRun:
    name: str
    seconds: float
    ran: int  # items computed now
    cached: int  # items taken from the cache


def _variant_from_record(record: dict[str, Any], entry: Path) -> Variant:
    return Variant(kind=record["kind"], path=entry / record["path"], files=tuple(record["files"]),
                   bytes=record["bytes"], sha256=record["sha256"], converter=record["converter"],
                   library_versions=record["library_versions"])


def convert_stage(stage: StageInput, kinds: list[str], options: ConvertOptions) -> tuple[list[Variant], StageRun]:
    """One cache entry per kind; the missing kinds are converted together per converter (so GGUF quantizations
    share one float base), and each converter's results are kept as soon as it finishes."""
    cache, model, model_fingerprint, force = stage.cache, stage.model, stage.fingerprint, stage.force
    started = time.perf_counter()
    versions = library_versions(CONVERT_LIBRARIES)

    def key(kind: str) -> str:
        relevant = converter_for(kind).cache_options(kind, options)
        return digest_of({"stage": "convert", "model": model_fingerprint, "kind": kind, "options": relevant,
                          "versions": versions})

    found: dict[str, Variant] = {}
    missing: list[str] = []
    for kind in kinds:
        record = None if force else cache.load("convert", key(kind))
        if record is None:
            missing.append(kind)
        else:
            found[kind] = _variant_from_record(record, cache.entry("convert", key(kind)))
    groups: dict[int, list[str]] = {}
    for kind in missing:
        groups.setdefault(id(converter_for(kind)), []).append(kind)
    stage_dir = cache.root / "convert"
    remove_abandoned_scratch_dirs(stage_dir, WORK_PREFIX)
    for group in groups.values():
        with held_scratch_dir(stage_dir, f"{WORK_PREFIX}{group[0]}-") as work:
            for variant in convert(model, group, work, replace(options, force=True)):
                found[variant.kind] = _keep_variant(cache, key(variant.kind), variant, force)
    variants = [found[kind] for kind in kinds]
    return variants, StageRun("convert", time.perf_counter() - started, len(missing), len(kinds) - len(missing))


def _keep_variant(cache: StageCache, key: str, variant: Variant, force: bool) -> Variant:
    def fill(directory: Path) -> dict[str, Any]:
        os.replace(variant.path, directory / variant.path.name)
        record = asdict(variant)
        record["path"] = variant.path.name
        return record

    record, entry = cache.store("convert", key, fill, replace_existing=force)
    return _variant_from_record(record, entry)


def quality_stage(stage: StageInput, variants: list[Variant], options: EvalOptions) -> tuple[QualityReport, StageRun]:
    """Each variant's metrics are cached ungated (the gate is applied afterwards, so changing the gate costs
    nothing); a variant is kept as soon as it is scored."""
    from edgepack.quality.evaluate import evaluate
    from edgepack.quality.reference import text_sha256
    from edgepack.quality.tasks import builtin_tasks, tasks_digest

    cache, model, force, gate, tasks = stage.cache, stage.model, stage.force, options.gate, options.tasks
    started = time.perf_counter()
    text = options.text
    base = {"stage": "quality", "record": 6, "model": stage.fingerprint, "text": text_sha256(text),
            "top_k": options.top_k, "tasks": digest_of([asdict(t) for t in tasks] if tasks else None),
            "window": options.window,
            "behaviour": tasks_digest(builtin_tasks()) if options.behaviour else None,
            "versions": library_versions(QUALITY_LIBRARIES)}
    keys = {v.kind: digest_of({**base, "variant": v.sha256}) for v in variants}
    records: dict[str, dict[str, Any]] = {}
    for v in variants:
        record = None if force else cache.load("quality", keys[v.kind])
        if record is not None:
            records[v.kind] = record
    missing = [v for v in variants if v.kind not in records]
    kind_of = {v.path: v.kind for v in variants}
    if missing:

        def keep(result: VariantQuality, shared: dict[str, Any]) -> None:
            kind = kind_of[result.path]
            record = {"variant": asdict(result), "report": shared}
            cache.store("quality", keys[kind], lambda _directory: record, replace_existing=force)
            records[kind] = record

        # the gate only labels the progress lines: records keep the metrics, and are gated below on every run
        fresh = evaluate(model, [v.path for v in missing], replace(options, eval_text=text),
                         on_variant=keep)
        crashed = tuple(replace(c, name=kind_of[c.path]) for c in fresh.crashed)  # never cached: a retry may pass
        shared = {f.name: getattr(fresh, f.name) for f in fields(QualityReport)
                  if f.name not in ("model", "gate", "variants", "crashed")}
    else:
        crashed, shared = (), records[variants[0].kind]["report"]
    gated = []
    for v in variants:
        if v.kind not in records:
            continue  # crashed
        data = dict(records[v.kind]["variant"])
        data["path"] = v.path
        data["name"] = v.kind
        data["ppl_ratio_ci"], data["kld_mean_ci"] = tuple(data["ppl_ratio_ci"]), tuple(data["kld_mean_ci"])
        data["behaviour"] = BehaviourQuality.from_dict(data["behaviour"]) if data["behaviour"] else None
        ungated = VariantQuality(**data)
        reasons = gate.reasons(ungated)
        gated.append(replace(ungated, passed=not reasons, reasons=reasons))
    report = QualityReport(model=model, gate=gate.as_dict(), variants=tuple(gated), **shared, crashed=crashed)
    return report, StageRun("quality", time.perf_counter() - started, len(missing), len(variants) - len(missing))


@functools.cache
def host_identity() -> dict[str, Any]:
    """This machine in cache keys; detected once a process (detection reads /proc and runs nvidia-smi), since every
    measurement's key has it."""
    from edgepack.measure.hardware import detect

    device = detect()
    return {"cpu": device.cpu_model, "cores": device.physical_cores, "ram": device.ram_total_bytes,
            "machine": device.machine}


@dataclass(frozen=True)
class MeasureResult:
    """This machine's measurements at the build's context, each variant's shape, and per engine what the prediction
    model fitted (with its held-out error) when the target is not this machine."""

    measurements: DeviceMeasurements
    shapes: dict[str, ModelShape]
    fits: dict[str, EngineFit]


def measure_stage(stage: StageInput, variants: list[Variant], options: ProfileOptions, predicting: bool
                  ) -> tuple[MeasureResult, StageRun]:
    """Each variant measured on this machine in its own process at `options.context` (cached per variant and host),
    with its shape (layers, KV heads, weight bytes); the read bandwidth once per host and thread count.
    `predicting`: the target is elsewhere, so the extra runs the prediction model is fitted and checked on are made
    too (edgepack/measure/on_target.py's fit_runs)."""
    from edgepack.measure.on_target import FitRun, fit_engines, fit_runs

    threads = options.thread_count
    options = replace(options, threads=threads)
    started = time.perf_counter()
    bandwidth = {threads: _bandwidth(stage, threads)}
    counts = {"ran": 0}
    measured, crashed = [], []
    shapes: dict[str, ModelShape] = {}
    notes: list[str] = []
    for v in variants:
        variant_options = _on_a_usable_device(v, options, notes)
        try:
            (m,), shape = _measure_cached(stage, v, variant_options, counts)
        except EngineCrashedError as exc:  # not cached: a retry may pass
            crashed.append(replace(crashed_variant(v.path, "measure", exc), name=v.kind))
            continue
        measured.append(m)
        shapes[v.kind] = shape
    extra = []
    runs = fit_runs([v for v in variants if v.kind in shapes], {m.name: m.engine for m in measured}, threads,
                    options.context or 0) if predicting and measured else []
    for run in runs:
        variant = next(v for v in variants if v.kind == run.kind)
        if run.threads not in bandwidth:
            bandwidth[run.threads] = _bandwidth(stage, run.threads)
        try:
            if run.purpose == "pair":
                pair, _ = _measure_cached(stage, variant, replace(options, context=run.context), counts,
                                       paired_threads=run.threads)
                extra += [(FitRun(run.kind, threads, run.context, "pair"), pair[0]), (run, pair[1])]
            else:
                (m,), _ = _measure_cached(stage, variant, replace(options, threads=run.threads, context=run.context),
                                       counts)
                extra.append((run, m))
        except EngineCrashedError:
            continue  # the variant itself was measured: the fit goes without this run
    fits = fit_engines(measured, extra, shapes, bandwidth) if predicting and measured else {}
    result = DeviceMeasurements(memory_bandwidth_gbps=bandwidth[threads], variants=tuple(measured),
                                notes=tuple(notes) + power_notes(measured), crashed=tuple(crashed))
    ran = counts["ran"]
    return MeasureResult(result, shapes, fits), StageRun("measure", time.perf_counter() - started, ran,
                                                         max(0, len(variants) + len(runs) - ran))


def _on_a_usable_device(v: Variant, options: ProfileOptions, notes: list[str]) -> ProfileOptions:
    """The options, on the CPU where the variant's engine cannot run on the GPU asked for (its server falls back to
    the CPU the same way)."""
    from runtimes.registry import engine_supports_device

    if options.device == "cpu":
        return options
    engine = converter_for(v.kind).engines[0]
    if engine_supports_device(engine, options.device):
        return options
    notes.append(f"{v.kind} measured on the CPU: this machine's {engine} cannot run on {options.device} (a build "
                 "with GPU support would), and its server would fall back to the CPU the same way")
    return replace(options, device="cpu")


def _bandwidth(stage: StageInput, threads: int) -> float:
    from edgepack.measure.bandwidth import measure_bandwidth_gbps

    key = digest_of({"stage": "bandwidth", "record": 2, "host": host_identity(), "threads": threads})
    record = None if stage.force else stage.cache.load("bandwidth", key)
    if record is None:
        say(f"measuring this machine's memory bandwidth ({threads} threads)")
        gbps = measure_bandwidth_gbps(threads)
        record, _ = stage.cache.store("bandwidth", key, lambda _directory: {"gbps": gbps},
                                      replace_existing=stage.force)
    return record["gbps"]


def _measure_cached(stage: StageInput, v: Variant, options: ProfileOptions, counts: dict[str, int],
                    paired_threads: int = 0) -> tuple[tuple[Measurement, ...], ModelShape]:
    """The variant measured in a child process (cached per variant and host): one Measurement, or with
    `paired_threads` two, at options.threads and at paired_threads, their runs alternated in one process."""
    key = digest_of({"stage": "measure", "record": 5, "host": host_identity(), "variant": v.sha256,
                     "threads": options.threads, "paired_threads": paired_threads, "context": options.context,
                     "device": options.device, "prompt": options.prompt_tokens,
                     "new": options.new_tokens, "runs": options.runs,
                     "versions": library_versions(MEASURE_LIBRARIES)})
    record = None if stage.force else stage.cache.load("measure", key)
    if record is None:
        pair = f" and {paired_threads}, alternated" if paired_threads else ""
        say(f"measuring {v.kind} on this machine ({options.device}, {options.threads}{pair} threads, context "
            f"{options.context}, {options.prompt_tokens}-token prompt, {options.new_tokens} new tokens, "
            f"{options.runs} runs)")
        made = measure_thread_pair(v.path, options, paired_threads) if paired_threads \
            else (measure_variant(v.path, options),)
        fresh = {"measurements": [asdict(m) for m in made], "shape": asdict(model_shape(v.path))}
        record, _ = stage.cache.store("measure", key, lambda _directory, r=fresh: r, replace_existing=stage.force)
        counts["ran"] += 1
    measurements = tuple(Measurement(**{**data, "path": v.path, "name": v.kind}) for data in record["measurements"])
    return measurements, ModelShape(**record["shape"])
