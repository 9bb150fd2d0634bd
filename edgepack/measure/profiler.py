"""Measure variants on this device: each in a fresh child process, so its memory is its own.

Per variant: load time, peak RSS (and what the model added to it), time to first token, prefill t/s at a given
prompt length, decode t/s over a given number of tokens (a warm-up run, then the median of several with min/max),
threads and context. The device's memory bandwidth is measured once.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgepack.core.artifacts import CrashedVariant
from edgepack.core.errors import EdgepackError, EngineCrashedError
from edgepack.core.isolation import describe_exit
from edgepack.core.progress import progress_bar
from edgepack.measure.bandwidth import measure_bandwidth_gbps

# a fixed text, cut to the prompt length in tokens
PROMPT_TEXT = (
    "The harbour town woke slowly. Fishing boats came in one after another, their decks stacked with crates, and "
    "the gulls followed them in long noisy circles. At the market, a woman sold bread from a cart, a boy counted "
    "coins on an upturned barrel, and an old man repaired a net with quick, sure fingers. "
) * 40


@dataclass(frozen=True)
class Measurement:
    name: str
    path: Path
    engine: str
    threads: int
    context: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    load_s: float
    peak_rss_mib: float
    model_rss_mib: float  # peak RSS less the process's RSS before the model was loaded
    engine_memory_mib: float  # what the engine reports it holds: weights + KV cache
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    decode_tps_min: float
    decode_tps_max: float
    device: str = "cpu"  # where the engine ran the model: cpu, cuda, metal
    joules_per_token: float | None = None  # while decoding, where a power sensor is readable
    power_source: str | None = None


@dataclass(frozen=True)
class DeviceMeasurements:
    memory_bandwidth_gbps: float
    variants: tuple[Measurement, ...]
    notes: tuple[str, ...]
    crashed: tuple[CrashedVariant, ...] = ()  # measured by nobody: their engine crashed
    measured_on: str | None = None  # None: this machine; else the device's ssh:// address
    device_description: str | None = None  # the measuring device, as detected there


def peak_rss_bytes() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _import_engine_libraries(path: Path) -> None:
    """The variant's engine libraries are loaded before the model, so they do not count as the model's memory. Only
    its own: a device measured over SSH may have one engine installed."""
    import importlib

    path = Path(path)
    names = ("llama_cpp",) if path.is_file() else ("onnxruntime", "transformers") \
        if (path / "model.onnx").is_file() else ("torch", "transformers")
    for name in names:
        importlib.import_module(name)


def measure_in_this_process(path: Path, threads: int, prompt_tokens: int, new_tokens: int, runs: int,
                            context: int | None, device: str = "cpu") -> Measurement:
    """The child's side: load, warm up, run; a Measurement of one variant."""
    import psutil

    from edgepack.measure.power import open_meter

    _import_engine_libraries(path)

    from runtimes.base import GenerationOptions, LoadOptions
    from runtimes.registry import open_runtime

    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    runtime = open_runtime(path, LoadOptions(threads=threads, context_length=context or prompt_tokens + new_tokens + 8,
                                             device=device))
    load_s = time.perf_counter() - started
    prompt = runtime.tokenize(PROMPT_TEXT)[:prompt_tokens]
    if len(prompt) < prompt_tokens:
        raise EdgepackError(f"the profiling prompt gives only {len(prompt)} tokens; ask for fewer")
    options = GenerationOptions(max_tokens=new_tokens, ignore_eos=True)

    meter = open_meter(device)
    decode_joules = []

    run_count = 0

    def one_run() -> tuple[float, float]:
        # each run's prompt starts elsewhere in the text, so no engine reads it from a cache of the previous
        # run's (llama.cpp's slots keep the longest shared prefix, and prefill would read ~zero tokens)
        nonlocal run_count
        shift = run_count % len(prompt)
        run_count += 1
        rotated = prompt[shift:] + prompt[:shift]
        start = time.perf_counter()
        first, joules_at_first = None, 0.0
        for chunk in runtime.generate(rotated, options):
            if first is None and chunk.token_id is not None:
                first = time.perf_counter()
                joules_at_first = meter.read_joules() if meter else 0.0
        end = time.perf_counter()
        if meter:
            decode_joules.append((meter.read_joules() - joules_at_first) / (new_tokens - 1))
        return first - start, (new_tokens - 1) / (end - first)

    one_run()
    decode_joules.clear()
    try:
        results = [one_run() for _ in range(runs)]
    finally:
        if meter:
            meter.close()
    ttft = statistics.median(r[0] for r in results)
    decode = [r[1] for r in results]
    peak = peak_rss_bytes()
    return Measurement(
        name=path.stem if path.is_file() else path.name, path=path, engine=runtime.name, threads=threads,
        context=runtime.context_length, prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs,
        load_s=load_s, peak_rss_mib=peak / 2**20, model_rss_mib=(peak - before) / 2**20,
        engine_memory_mib=runtime.memory_bytes() / 2**20, ttft_s=ttft, prefill_tps=prompt_tokens / ttft,
        decode_tps=statistics.median(decode), decode_tps_min=min(decode), decode_tps_max=max(decode), device=device,
        joules_per_token=statistics.median(decode_joules) if decode_joules else None,
        power_source=meter.source if meter else None)


@dataclass(frozen=True)
class ProfileOptions:
    threads: int | None = None  # None: one per physical core
    prompt_tokens: int = 128
    new_tokens: int = 64
    runs: int = 3  # measured runs after one warm-up
    context: int | None = None  # None: just what the prompt and the new tokens need
    device: str = "cpu"  # where the engine runs the model: cpu, cuda, metal
    show_progress: bool = True

    @property
    def thread_count(self) -> int:
        from runtimes.base import physical_cores

        return self.threads or physical_cores()


def measure_variant(path: Path, options: ProfileOptions | None = None) -> Measurement:
    """Measure one variant in a fresh child process."""
    o = options or ProfileOptions()
    command = [sys.executable, "-m", "edgepack.measure.profiler", str(path), str(o.thread_count),
               str(o.prompt_tokens), str(o.new_tokens), str(o.runs), str(o.context or 0), o.device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode < 0:  # a signal: the engine crashed
        cause, hint = describe_exit(done.returncode)
        raise EngineCrashedError(f"profiling {Path(path).name}: the engine crashed with {cause}; {hint}", cause=cause)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgepackError(f"profiling {path} failed: {last}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    data["path"] = Path(data["path"])
    return Measurement(**data)


def profile(paths: list[Path], options: ProfileOptions | None = None) -> DeviceMeasurements:
    """Each variant measured in its own process, and this machine's memory bandwidth."""
    options = options or ProfileOptions()
    for path in paths:
        if not Path(path).exists():
            raise EdgepackError(f"{path} does not exist; expected a .gguf file or an ONNX variant directory")
    threads = options.thread_count
    notes = []
    bandwidth = measure_bandwidth_gbps(threads)
    measured, crashed = [], []
    with progress_bar("profiling", len(paths), options.show_progress) as advance:
        for path in map(Path, paths):
            try:
                measured.append(measure_variant(path, options))
            except EngineCrashedError as exc:
                crashed.append(crashed_variant(path, "measure", exc))
            advance(1)
    return DeviceMeasurements(memory_bandwidth_gbps=bandwidth, variants=tuple(measured),
                              notes=tuple(notes) + power_notes(measured), crashed=tuple(crashed))


def power_notes(measured: list[Measurement]) -> tuple[str, ...]:
    if any(m.joules_per_token is not None for m in measured):
        return ()
    return ("no power sensor readable (RAPL energy counters, nvidia-smi, Jetson INA3221): joules per token not "
            "measured",)


def require_measured(result: DeviceMeasurements) -> None:
    """Raise EngineCrashedError (exit 8) when every variant's engine crashed."""
    if result.crashed and not result.variants:
        raise EngineCrashedError("no variant could be measured: " + "; ".join(c.detail for c in result.crashed),
                                 cause=result.crashed[0].cause)


def crashed_variant(path: Path, stage: str, error: EngineCrashedError) -> CrashedVariant:
    return CrashedVariant(name=path.stem if path.is_file() else path.name, path=path, stage=stage,
                          cause=error.cause, detail=str(error))


if __name__ == "__main__":  # the child process of measure_variant
    import dataclasses

    path_arg, threads_arg, prompt_arg, new_arg, runs_arg, context_arg = sys.argv[1:7]
    device_arg = sys.argv[7] if len(sys.argv) > 7 else "cpu"
    result = measure_in_this_process(Path(path_arg), int(threads_arg), int(prompt_arg), int(new_arg), int(runs_arg),
                                     int(context_arg) or None, device_arg)
    print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}))
