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


class _Timer:
    """One loaded runtime and its timed generations from the profiling prompt."""

    def __init__(self, path: Path, threads: int, prompt_tokens: int, new_tokens: int, context: int | None,
                 device: str, meter) -> None:
        import psutil

        from runtimes.base import GenerationOptions, LoadOptions
        from runtimes.registry import open_runtime

        self.threads, self.prompt_tokens, self.new_tokens, self.meter = threads, prompt_tokens, new_tokens, meter
        self.rss_before = psutil.Process().memory_info().rss
        started = time.perf_counter()
        self.runtime = open_runtime(path, LoadOptions(threads=threads, device=device,
                                                      context_length=context or prompt_tokens + new_tokens + 8))
        self.load_s = time.perf_counter() - started
        self.prompt = self.runtime.tokenize(PROMPT_TEXT)[:prompt_tokens]
        if len(self.prompt) < prompt_tokens:
            raise EdgepackError(f"the profiling prompt gives only {len(self.prompt)} tokens; ask for fewer")
        self.options = GenerationOptions(max_tokens=new_tokens, ignore_eos=True)
        self.run_count = 0
        self.results: list[tuple[float, float]] = []  # (time to first token, decode t/s) of the measured runs
        self.decode_joules: list[float] = []

    def run(self, measured: bool = True) -> None:
        # each run's prompt starts elsewhere in the text, so no engine reads it from a cache of the previous
        # run's (llama.cpp's slots keep the longest shared prefix, and prefill would read ~zero tokens)
        shift = self.run_count % len(self.prompt)
        self.run_count += 1
        rotated = self.prompt[shift:] + self.prompt[:shift]
        start = time.perf_counter()
        first, joules_at_first = None, 0.0
        for chunk in self.runtime.generate(rotated, self.options):
            if first is None and chunk.token_id is not None:
                first = time.perf_counter()
                joules_at_first = self.meter.read_joules() if self.meter else 0.0
        end = time.perf_counter()
        if measured:
            self.results.append((first - start, (self.new_tokens - 1) / (end - first)))
            if self.meter:
                self.decode_joules.append((self.meter.read_joules() - joules_at_first) / (self.new_tokens - 1))

    def measurement(self, path: Path, device: str, peak_rss: int, model_rss: int) -> Measurement:
        ttft = statistics.median(r[0] for r in self.results)
        decode = [r[1] for r in self.results]
        return Measurement(
            name=path.stem if path.is_file() else path.name, path=path, engine=self.runtime.name,
            threads=self.threads, context=self.runtime.context_length, prompt_tokens=self.prompt_tokens,
            new_tokens=self.new_tokens, runs=len(self.results), load_s=self.load_s, peak_rss_mib=peak_rss / 2**20,
            model_rss_mib=model_rss / 2**20, engine_memory_mib=self.runtime.memory_bytes() / 2**20, ttft_s=ttft,
            prefill_tps=self.prompt_tokens / ttft, decode_tps=statistics.median(decode),
            decode_tps_min=min(decode), decode_tps_max=max(decode), device=device,
            joules_per_token=statistics.median(self.decode_joules) if self.decode_joules else None,
            power_source=self.meter.source if self.meter else None)


def measure_in_this_process(path: Path, threads: int, prompt_tokens: int, new_tokens: int, runs: int,
                            context: int | None, device: str = "cpu") -> Measurement:
    """The child's side: load, warm up, run; a Measurement of one variant."""
    from edgepack.measure.power import open_meter

    _import_engine_libraries(path)
    meter = open_meter(device)
    try:
        timer = _Timer(path, threads, prompt_tokens, new_tokens, context, device, meter)
        timer.run(measured=False)
        for _ in range(runs):
            timer.run()
    finally:
        if meter:
            meter.close()
    peak = peak_rss_bytes()
    return timer.measurement(path, device, peak, peak - timer.rss_before)


def measure_alternated_in_this_process(variants: list[tuple[Path, int]], prompt_tokens: int, new_tokens: int,
                                       runs: int, context: int | None, device: str = "cpu"
                                       ) -> tuple[Measurement, ...]:
    """Several (variant, threads) loaded in one process and their runs alternated, for figures whose ratio matters
    more than their level. Memory: the first's model RSS is the peak before the second was loaded (as
    measure_in_this_process counts it; its later runs read the same positions again); each later one's is what
    loading and warming it up left resident, not a peak; the peak RSS is the process's, all of them in."""
    import psutil

    from edgepack.measure.power import open_meter

    for path, _ in variants:
        _import_engine_libraries(path)
    meter = open_meter(device)
    timers, memory = [], []
    try:
        for path, count in variants:
            timer = _Timer(path, count, prompt_tokens, new_tokens, context, device, meter)
            timer.run(measured=False)
            memory.append(peak_rss_bytes() - timer.rss_before if not timers
                          else psutil.Process().memory_info().rss - timer.rss_before)
            timers.append(timer)
        for _ in range(runs):
            for timer in timers:
                timer.run()
    finally:
        if meter:
            meter.close()
    peak = peak_rss_bytes()
    return tuple(timer.measurement(path, device, peak, own)
                 for (path, _), timer, own in zip(variants, timers, memory, strict=True))


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
    (measurement,) = _measure_in_a_child(path, options or ProfileOptions())
    return measurement


def measure_thread_pair(path: Path, options: ProfileOptions, other_threads: int) -> tuple[Measurement, Measurement]:
    """One variant at `options.threads` and at `other_threads` in one fresh child process, their runs alternated
    (measure_alternated_in_this_process), so that a drift of the machine's speed (seen here: 20% between processes
    minutes apart) hits both alike and their ratio, which says how decode scales with threads, holds."""
    first, second = _measure_in_a_child(path, options, other_threads)
    return first, second


def _measure_in_a_child(path: Path, o: ProfileOptions, other_threads: int = 0) -> list[Measurement]:
    command = [sys.executable, "-m", "edgepack.measure.profiler", str(path), str(o.thread_count),
               str(o.prompt_tokens), str(o.new_tokens), str(o.runs), str(o.context or 0), o.device,
               str(other_threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode < 0:  # a signal: the engine crashed
        cause, hint = describe_exit(done.returncode)
        raise EngineCrashedError(f"profiling {Path(path).name}: the engine crashed with {cause}; {hint}", cause=cause)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgepackError(f"profiling {path} failed: {last}")
    measurements = []
    for data in json.loads(done.stdout.strip().splitlines()[-1]):
        data["path"] = Path(data["path"])
        measurements.append(Measurement(**data))
    return measurements


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


if __name__ == "__main__":  # the child process of measure_variant and measure_thread_pair
    import dataclasses

    path_arg, threads_arg, prompt_arg, new_arg, runs_arg, context_arg = sys.argv[1:7]
    device_arg = sys.argv[7] if len(sys.argv) > 7 else "cpu"
    other_threads_arg = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    sizes = (int(prompt_arg), int(new_arg), int(runs_arg), int(context_arg) or None, device_arg)
    if other_threads_arg:
        results = measure_alternated_in_this_process([(Path(path_arg), int(threads_arg)),
                                                      (Path(path_arg), other_threads_arg)], *sizes)
    else:
        results = (measure_in_this_process(Path(path_arg), int(threads_arg), *sizes),)
    print(json.dumps([{k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
                      for result in results]))
