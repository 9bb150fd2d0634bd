"""`edgepack build`: convert -> quality -> measure here (and predict for the target) -> select -> bundle.

Every stage's output is cached by content hash (edgepack/pipeline/stage_cache.py), so a build that was interrupted
resumes where it stopped and a repeated build only re-checks the bundle. The stages themselves are in stages.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from converters.registry import ConvertOptions, converters
from converters.registry import formats as registered_formats
from edgepack.bundle.device_install import install_on_device
from edgepack.bundle.write import SERVE_DEVICE, Bundle, BundleRequest, write_bundle
from edgepack.core.artifacts import Decision, QualityReport, StudentModel, Variant, to_json_dict
from edgepack.core.cache import cache_root
from edgepack.core.errors import EdgepackError, NothingPassedError
from edgepack.core.fileio import check_safe_name
from edgepack.core.progress import say
from edgepack.measure.on_target import candidates, performance_on_target
from edgepack.measure.predict import Prediction, engine_kv_bytes
from edgepack.measure.profiler import DeviceMeasurements, ProfileOptions
from edgepack.measure.remote import DeviceSide, DeviceStepError, SshDevice, connect, device_target, measure_on_device
from edgepack.measure.targets import TargetProfile
from edgepack.pipeline.stage_cache import StageCache, digest_of, directory_fingerprint
from edgepack.pipeline.stages import StageInput, StageRun, convert_stage, measure_stage, quality_stage
from edgepack.quality.evaluate import EvalOptions
from edgepack.quality.gate import Gate
from edgepack.quality.tasks import Task
from edgepack.select import Preference, reject_crashed, select
from runtimes.base import DEFAULT_CONTEXT_CAP


@dataclass(frozen=True)
class BuildOptions:
    out_dir: Path = Path("dist")
    formats: tuple[str, ...] = ()  # formats and/or variant kinds; () is every registered format
    context: int | None = None  # the context the server allocates; default min(model's, 4096)
    gate: Gate = field(default_factory=Gate)
    tasks: tuple[Task, ...] = ()
    behaviour: bool = True  # the built-in behaviour prompts, for a model with a chat template
    eval_text: str | None = None
    imatrix: bool = True  # GGUF quantized kinds with an importance matrix (the IQ kinds need one)
    calibration_text: str | None = None  # the importance matrix's text; None: the built-in one
    prefer: Preference = "speed"
    offline_wheels: bool = False
    chat_template: str | None = None  # served instead of the model's own (or for a model that has none)
    force: bool = False
    threads: int | None = None  # for measuring here; default: one per physical core
    measure_on: SshDevice | None = None  # measure on the target device over SSH too
    allow_predicted: bool = False  # when measuring on the device fails, predict instead of failing
    allow_pickle: bool = False
    show_progress: bool = True


@dataclass(frozen=True)
class BuildResult:
    bundle: Bundle
    decision: Decision
    quality: QualityReport
    performance: tuple[Prediction, ...]
    measurements: DeviceMeasurements
    device_measurements: DeviceMeasurements | None  # the target device's, when measured over SSH
    variants: tuple[Variant, ...]
    target: TargetProfile
    stages: tuple[StageRun, ...]
    seconds: float


def parse_formats(text: str | None) -> tuple[str, ...]:
    """`--formats gguf,onnx-int8`; None (not given) is every registered format."""
    if text is None:
        return ()
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise EdgepackError(f"--formats is empty; accepted: {', '.join(registered_formats())}, or variant kinds "
                            "such as gguf-q8_0")
    return items


def variant_kinds(formats: tuple[str, ...], target: TargetProfile) -> list[str]:
    """`--formats` items are formats (gguf, onnx: their default kinds) or kinds; only the target's formats stay."""
    registered = {converter.name: converter for converter in converters()}
    examples = ", ".join(converter.default_kinds[-1] for converter in registered.values())
    kinds: list[str] = []
    for item in formats or tuple(registered):
        item = item.strip().lower()
        kinds += registered[item].default_kinds if item in registered else (item,)
    if not kinds:
        raise EdgepackError(f"--formats is empty; accepted: {', '.join(registered)}, or variant kinds such as "
                            f"{examples}")
    for kind in kinds:
        fmt = kind.split("-", 1)[0]
        if fmt not in registered:
            raise EdgepackError(f"--formats: {kind!r} is not a format or variant kind; accepted: "
                                f"{', '.join(registered)}, or kinds such as {examples}")
        if fmt not in target.formats:
            raise EdgepackError(f"--formats: {kind} is a {fmt} variant, and target {target.name} runs "
                                f"{', '.join(target.formats)} only")
    return list(dict.fromkeys(kinds))


def _host_description() -> str:
    from edgepack.measure.hardware import detect

    device = detect()
    return f"{device.cpu_model or 'unknown CPU'}, {device.physical_cores} cores, " \
           f"{(device.ram_total_bytes or 0) / 2**30:.0f} GiB"


def build(model: Path, target: TargetProfile | None, options: BuildOptions | None = None) -> BuildResult:
    """`target` None: the device of `options.measure_on`, as detected there."""
    from edgepack.student.load import load_student
    from runtimes.base import physical_cores

    options = options or BuildOptions()
    started = time.perf_counter()
    student = load_student(model, allow_pickle=options.allow_pickle)
    context = options.context or min(student.context_length, DEFAULT_CONTEXT_CAP)
    if context < 16 or context > student.context_length:
        raise EdgepackError(f"--context {context}: must be between 16 and the model's context length "
                            f"({student.context_length})")
    check_safe_name(student.path.name, "the model folder's name")  # it names the bundle: checked before any write
    device, fallback = _reach_device(options, target)  # before converting: an unreachable device fails fast
    if target is None:
        if device is None:
            raise EdgepackError("no target: give --target or --profile, or --measure-on ssh://… to build for the "
                                "device measured there")
        target = device_target(device)
    check_safe_name(target.name, "the target's name")
    kinds = variant_kinds(options.formats, target)
    threads = options.threads or physical_cores()
    say(f"[1/5] fingerprinting {student.path.name}")
    stage = StageInput(StageCache(cache_root() / "build"), student.path, directory_fingerprint(student.path),
                       options.force)
    fingerprint = stage.fingerprint

    say(f"[2/5] convert: {', '.join(kinds)}")
    convert_options = ConvertOptions(allow_pickle=options.allow_pickle, show_progress=options.show_progress,
                                     int8_isa=target.int8_isa, imatrix=options.imatrix,
                                     calibration_text=options.calibration_text)
    variants, convert_run = convert_stage(stage, kinds, convert_options)

    say("[3/5] quality against the original model")
    quality, quality_run = quality_stage(stage, variants, EvalOptions(
        eval_text=options.eval_text, tasks=options.tasks, behaviour=options.behaviour, gate=options.gate,
        threads=options.threads,
        show_progress=options.show_progress))

    predicting = target.source != "detected"
    where = "measure here" if not predicting else f"measure here, predict for {target.name}"
    say(f"[4/5] {where}" + (f", and measure on {device.session.device.url}" if device else ""))
    scored = {q.name for q in quality.variants}
    # on a host with a GPU, measured where its bundle will serve; for another target, on the CPU it is predicted from
    serve_on = "cpu" if predicting else SERVE_DEVICE[target.accelerator]
    measured_here, measure_run = measure_stage(stage, [v for v in variants if v.kind in scored],
                                               ProfileOptions(threads=threads, context=context, device=serve_on),
                                               predicting)
    measurements, shapes = measured_here.measurements, measured_here.shapes
    on_device = None
    if device is not None:
        try:
            on_device = measure_on_device(device, [v for v in variants if v.kind in shapes],
                                          ProfileOptions(context=context), stage.cache, options.force)
        except DeviceStepError as exc:
            if not options.allow_predicted:
                raise
            fallback = str(exc)
            say(f"warning: {exc}; predicting for {target.name} instead (--allow-predicted)")
    if fallback:
        measurements = replace(measurements, notes=measurements.notes + (
            f"not measured on the device ({fallback}): every figure for {target.name} is predicted",))
    # a variant whose engine crashed in either stage (or on the device) is rejected for it, and the build goes on
    crashed = measurements.crashed + (on_device.crashed if on_device else ())
    measured = {m.name for m in measurements.variants} - {c.name for c in crashed}
    usable = [v for v in variants if v.kind in measured]
    quality = replace(quality, variants=tuple(q for q in quality.variants if q.name in measured),
                      crashed=quality.crashed + crashed)
    if not usable:
        raise NothingPassedError("no variant could be run: " + "; ".join(c.detail for c in quality.crashed))
    performance = performance_on_target(usable, measurements, target, context, shapes, measured_here.fits, on_device)
    decision = reject_crashed(select(candidates(usable, quality, performance), int(target.memory_budget_gib * 2**30),
                                     options.prefer), quality.crashed)

    say(f"[5/5] bundle: {decision.chosen}")
    bundle_started = time.perf_counter()
    chosen = next(v for v in variants if v.kind == decision.chosen)
    engine = next(p.engine for p in performance if p.variant == chosen.kind)
    chosen_memory = next(p.memory_bytes for p in performance if p.variant == chosen.kind)
    parallel = serving_parallel(engine, decision.budget_bytes - chosen_memory,
                                engine_kv_bytes(shapes[chosen.kind], engine, context))
    name = f"{student.path.name}-{target.name}"
    report = _report(student, fingerprint, target, context, quality, performance, measurements, decision,
                     variants, on_device)
    request = BundleRequest(
        out_dir=options.out_dir, name=name, build_key=digest_of({"report": report, "variant": chosen.sha256,
                                                                 "threads": target.cpu_cores,
                                                                 "offline_wheels": options.offline_wheels,
                                                                 "chat_template": options.chat_template,
                                                                 "parallel": parallel}),
        model=report["model"], variant=chosen, engine=engine, target=target, report=report, context=context,
        threads=target.cpu_cores, offline_wheels=options.offline_wheels, chat_template=options.chat_template,
        parallel=parallel)
    bundle = write_bundle(request)
    bundle_run = StageRun("bundle", time.perf_counter() - bundle_started, 0 if bundle.reused else 1,
                          1 if bundle.reused else 0)
    return BuildResult(bundle=bundle, decision=decision, quality=quality, performance=tuple(performance),
                       measurements=measurements, device_measurements=on_device, variants=tuple(variants),
                       target=target, stages=(convert_run, quality_run, measure_run, bundle_run),
                       seconds=time.perf_counter() - started)


def _reach_device(options: BuildOptions, target: TargetProfile | None) -> tuple[DeviceSide | None, str | None]:
    """The device of --measure-on, connected and described, or (None, why) under --allow-predicted."""
    if options.measure_on is None:
        return None, None
    engines = {engine for converter in converters() for engine in converter.engines[:1]
               if not options.formats or any(item.split("-", 1)[0] == converter.name for item in options.formats)}
    try:
        return connect(options.measure_on, engines, None, install=install_on_device), None
    except DeviceStepError as exc:
        if not options.allow_predicted or target is None:
            if options.allow_predicted:
                raise EdgepackError(f"{exc}; --allow-predicted needs --target or --profile to predict for") from None
            raise
        say(f"warning: {exc}; predicting for {target.name} instead (--allow-predicted)")
        return None, str(exc)


def _without_paths(data: dict[str, Any]) -> dict[str, Any]:
    """This machine's paths stay out of a bundle: a variant is named by its kind."""
    return {key: value for key, value in data.items() if key != "path"}


def _report(student: StudentModel, fingerprint: str, target: TargetProfile, context: int, quality: QualityReport,
            performance: list[Prediction], measurements: DeviceMeasurements, decision: Decision,
            variants: list[Variant], on_device: DeviceMeasurements | None = None) -> dict[str, Any]:
    quality_data = to_json_dict(quality)
    quality_data["model"] = student.path.name
    quality_data["variants"] = [_without_paths(v) for v in quality_data["variants"]]
    quality_data["crashed"] = [_without_paths(c) for c in quality_data["crashed"]]
    host = _measurements_without_paths(measurements)
    return {
        "model": {"name": student.path.name, "architecture": student.architecture,
                  "hf_model_type": student.hf_model_type, "parameter_count": student.parameter_count,
                  "context_length": student.context_length, "tokenizer_kind": student.tokenizer_kind,
                  "dtype": student.dtype, "fingerprint": fingerprint, "origin": student.origin,
                  "distillation": student.distillation},
        "target": to_json_dict(replace(target, source=target.source if target.source == "detected"
                                       or target.source.startswith("ssh://") else Path(target.source).name)),
        "context": context, "build_host": _host_description(), "quality": quality_data,
        "performance": [to_json_dict(p) for p in performance], "host_measurements": host,
        "device_measurements": _measurements_without_paths(on_device) if on_device else None,
        "decision": to_json_dict(decision), "variant_bytes": {v.kind: v.bytes for v in variants},
    }


def _measurements_without_paths(measurements: DeviceMeasurements) -> dict[str, Any]:
    data = to_json_dict(measurements)
    data["variants"] = [_without_paths(m) for m in data["variants"]]
    data["crashed"] = [_without_paths(c) for c in data["crashed"]]
    return data


def serving_parallel(engine: str, spare_bytes: int, kv_bytes_per_sequence: int) -> int:
    """How many generations the bundle's server runs at once: the default where the budget left after the chosen
    variant (which counts one sequence's KV cache) holds the others' KV caches, fewer where it does not; one on an
    engine that does not batch."""
    from edgepack.serve.session import DEFAULT_PARALLEL

    if engine != "llamacpp":
        return 1
    return max(1, min(DEFAULT_PARALLEL, 1 + spare_bytes // max(kv_bytes_per_sequence, 1)))
