"""Predict what a variant needs and how fast it decodes where it was not measured: on a target we are not on, or
on this machine at another thread count or context.

Decode: time per token = compute x ((1 - p) + p / threads) + bytes read per token / (share x read bandwidth). Bytes
read are the weights and the KV cache of the positions so far; the read bandwidth is what `bandwidth.py`'s kernel
measures (on a target: its data-sheet figure x ACHIEVABLE_SHARE_OF_SPEC); the share (at most 1) and compute's parallel
share p are fitted per engine on this machine from two variants at two thread counts (each pair of counts measured in
one process, on_target.fit_engines), and each variant's compute from its own measurement.
Memory: the variant's measured RSS, moved to another context by the KV cache (per layer, with llama.cpp's
window-sized cache for sliding-window layers) and the engine's compute buffers, whose growth per token of context
is fitted from two contexts.
Every Prediction carries its basis, and the error the same model made on figures it was not fitted on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgepack.core.errors import EdgepackError
from edgepack.measure.profiler import Measurement
from edgepack.measure.targets import TargetProfile

# A target's read bandwidth is taken as this share of its data sheet's (an assumption: reduction kernels such as
# STREAM's reach 60-80% of the theoretical DRAM bandwidth on desktop and embedded CPUs). Where a device was measured
# over SSH, the report gives the share actually measured there.
ACHIEVABLE_SHARE_OF_SPEC = 0.7
KV_BYTES = {"llamacpp": 2, "onnxrt": 4, "torch": 4}  # f16 KV cache in llama.cpp, f32 in our ONNX export
# llama.cpp allocates the KV cache for the whole context when it loads, in cells padded to 256; ONNX Runtime and
# torch grow theirs with the tokens held
PREALLOCATES_KV = {"llamacpp": True, "onnxrt": False, "torch": False}
# llama.cpp's compute buffers grow with the context it allocates; ONNX Runtime's working memory follows the tokens of
# each forward pass (and our graph's KV buffers, allocated at the context length, are resident only as written), so
# for it no growth is fitted: a difference between two contexts would be noise (measured on the demo's three ONNX
# kinds, 512 -> 4096 tokens of context moved resident memory by -9 to +1 MiB)
BUFFERS_GROW_WITH_CONTEXT = {"llamacpp": True, "onnxrt": False, "torch": False}
LLAMACPP_KV_PAD = 256
LLAMACPP_UBATCH = 512  # llama.cpp's default micro-batch: a sliding-window layer keeps window + ubatch cells
# targets whose bundle serves on a GPU (a Jetson's bundle compiles llama.cpp with CUDA on the device)
GPU_ACCELERATORS = ("cuda", "metal", "jetson-gpu")


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    weight_bytes: int
    sliding_window: int = 0  # tokens a sliding-window layer attends to; 0: no such layers
    sliding_layers: int = 0  # how many layers use the sliding window


@dataclass(frozen=True)
class EngineFit:
    """What this machine's measurements say about one engine."""

    engine: str
    bandwidth_share: float  # decode's effective share of the read bandwidth, at most 1
    memory_per_context_token: float  # bytes of compute buffers per token of allocated context, beyond the KV cache
    basis: str  # what it was fitted on, in words
    decode_error: float | None = None  # largest relative error on held-out figures (None: not checked)
    memory_error: float | None = None
    parallel_share: float = 1.0  # of compute, across threads (Amdahl): 1 scales perfectly, 0 not at all


@dataclass(frozen=True)
class Prediction:
    variant: str
    target: str
    engine: str
    memory_bytes: int
    fits: bool
    decode_tps: float | None
    prefill_tps: float | None
    basis: str
    is_prediction: bool = True
    # where measured on the target device: what this machine's model predicted for it, side by side
    predicted_decode_tps: float | None = None
    predicted_memory_bytes: int | None = None
    decode_error: float | None = None  # the prediction's held-out error on the build machine (relative)
    memory_error: float | None = None


def _pad(value: int, step: int) -> int:
    return -(-value // step) * step


def _sliding_layer_count(layers: int, pattern) -> int:
    if isinstance(pattern, (list, tuple)):
        return sum(1 for flag in pattern[:layers] if flag)
    period = int(pattern)
    return sum(1 for il in range(layers) if period == 0 or il % period < period - 1)


def model_shape(path: Path) -> ModelShape:
    path = Path(path)
    if path.is_file():
        from edgepack.core.gguf_file import metadata_value, open_reader

        reader = open_reader(path)
        arch = metadata_value(reader, "general.architecture")
        heads = int(metadata_value(reader, f"{arch}.attention.head_count"))
        head_dim = metadata_value(reader, f"{arch}.attention.key_length") or \
            int(metadata_value(reader, f"{arch}.embedding_length")) // heads
        layers = int(metadata_value(reader, f"{arch}.block_count"))
        window = int(metadata_value(reader, f"{arch}.attention.sliding_window", 0) or 0)
        sliding = 0
        if window and arch == "gemma3":  # llama.cpp honours the window for gemma3 (phi3's is switched off there)
            sliding = _sliding_layer_count(layers, metadata_value(
                reader, f"{arch}.attention.sliding_window_pattern", 6))
        return ModelShape(layers=layers, kv_heads=int(metadata_value(reader, f"{arch}.attention.head_count_kv",
                                                                     heads)),
                          head_dim=int(head_dim), weight_bytes=sum(int(t.n_bytes) for t in reader.tensors),
                          sliding_window=window if sliding else 0, sliding_layers=sliding)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EdgepackError(f"{path}: cannot read the model's shape (no GGUF metadata, no config.json)")
    config = json.loads(config_path.read_text())
    heads = int(config["num_attention_heads"])
    weights = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.onnx") or f.suffix ==
                  ".safetensors")
    layer_types = config.get("layer_types") or []
    sliding = sum(1 for t in layer_types if t == "sliding_attention")
    return ModelShape(layers=int(config["num_hidden_layers"]),
                      kv_heads=int(config.get("num_key_value_heads") or heads),
                      head_dim=int(config.get("head_dim") or config["hidden_size"] // heads), weight_bytes=weights,
                      sliding_window=int(config.get("sliding_window") or 0) if sliding else 0, sliding_layers=sliding)


def kv_cache_bytes(shape: ModelShape, context: int, dtype_bytes: int, sliding: bool = False) -> int:
    """K and V of every layer for `context` tokens. `sliding`: as llama.cpp holds it, sliding-window layers keep
    min(context, window + micro-batch) cells, padded to 256."""
    per_token_layer = 2 * shape.kv_heads * shape.head_dim * dtype_bytes
    if not (sliding and shape.sliding_layers):
        return shape.layers * context * per_token_layer
    window_cells = _pad(min(context, shape.sliding_window + LLAMACPP_UBATCH), LLAMACPP_KV_PAD)
    return ((shape.layers - shape.sliding_layers) * context + shape.sliding_layers * window_cells) * per_token_layer


def engine_kv_bytes(shape: ModelShape, engine: str, tokens: int) -> int:
    """The KV cache `engine` holds for `tokens` tokens (llama.cpp: cells of the allocated context)."""
    llamacpp = engine == "llamacpp"
    cells = _pad(tokens, LLAMACPP_KV_PAD) if llamacpp else tokens
    return kv_cache_bytes(shape, cells, KV_BYTES.get(engine, 4), sliding=llamacpp)


def bytes_per_token(shape: ModelShape, position: int, engine: str) -> int:
    """Decoding one token at `position` reads every weight once and the KV cache of the positions so far."""
    return shape.weight_bytes + kv_cache_bytes(shape, position, KV_BYTES.get(engine, 4), sliding=engine == "llamacpp")


def decode_position(m: Measurement) -> int:
    """The mean position of the profiler's decoded tokens."""
    return m.prompt_tokens + m.new_tokens // 2


def kv_held(m: Measurement, shape: ModelShape) -> int:
    """The KV cache the engine held while the measurement ran."""
    tokens = m.context if PREALLOCATES_KV.get(m.engine, False) else m.prompt_tokens + m.new_tokens
    return engine_kv_bytes(shape, m.engine, tokens)


def compute_factor(fit: EngineFit, threads: int) -> float:
    """Compute time at `threads` relative to one thread: (1 - p) + p / threads, p the fitted parallel share."""
    return 1 - fit.parallel_share + fit.parallel_share / threads


def memory_seconds(m: Measurement, shape: ModelShape, share: float, bandwidth_gbps: float,
                   position: int | None = None) -> float:
    per_token = bytes_per_token(shape, decode_position(m) if position is None else position, m.engine)
    return per_token / (share * bandwidth_gbps * 1e9)


def compute_seconds(m: Measurement, shape: ModelShape, fit: EngineFit, bandwidth_here_gbps: float) -> float:
    """A variant's compute per token on one thread: its measured time per token less the memory time, scaled from
    the measurement's thread count."""
    at_measured = 1 / m.decode_tps - memory_seconds(m, shape, fit.bandwidth_share, bandwidth_here_gbps)
    return max(0.0, at_measured / compute_factor(fit, m.threads))


def predict_decode_tps(m: Measurement, shape: ModelShape, fit: EngineFit, threads: int, bandwidth_gbps: float,
                       bandwidth_here_gbps: float, position: int | None = None) -> float:
    """Decode t/s of the measured variant at `threads` and a read bandwidth of `bandwidth_gbps`.
    `bandwidth_here_gbps`: this machine's read bandwidth at the measurement's thread count."""
    compute = compute_seconds(m, shape, fit, bandwidth_here_gbps) * compute_factor(fit, threads)
    return 1 / (compute + memory_seconds(m, shape, fit.bandwidth_share, bandwidth_gbps, position))


def predict_memory_bytes(m: Measurement, shape: ModelShape, fit: EngineFit, context: int,
                         tokens_held: int | None = None) -> int:
    """The measured variant's memory at an allocated `context` with `tokens_held` tokens in its KV cache (default:
    the whole context, the most a server needs)."""
    held = context if tokens_held is None else tokens_held
    kv_then = engine_kv_bytes(shape, m.engine, context if PREALLOCATES_KV.get(m.engine, False) else held)
    buffers = fit.memory_per_context_token * (_pad(context, LLAMACPP_KV_PAD) - _pad(m.context, LLAMACPP_KV_PAD))
    return int(m.model_rss_mib * 2**20 - kv_held(m, shape) + kv_then + buffers)


SHARE_GRID = [step / 200 for step in range(200, 9, -1)]  # 1.00, 0.995, ... 0.05
PARALLEL_GRID = [step / 100 for step in range(100, -1, -1)]  # 1.00 ... 0.00


def _by_variant(points: list[Measurement], engine: str) -> dict[str, list[Measurement]]:
    by_variant: dict[str, list[Measurement]] = {}
    for m in points:
        if m.engine == engine:
            by_variant.setdefault(m.name, []).append(m)
    return by_variant


def fit_engine(engine: str, fit_points: list[Measurement], shapes: dict[str, ModelShape],
               bandwidth_gbps: dict[int, float], memory_points: list[Measurement] | None = None) -> EngineFit:
    """Decode: the share of the read bandwidth and compute's parallel share, the pair that best reproduces the fit
    points (least squares of relative errors, each variant with its own compute): two variants at two thread counts
    determine both; with one variant the compute is taken as parallel (share 1 of it). Memory: the compute buffers'
    growth from one variant at two contexts, among `memory_points` (default: the fit points). `shapes` by variant
    name; `bandwidth_gbps` by thread count."""
    share, parallel, how = _fit_decode(_by_variant(fit_points, engine), shapes, bandwidth_gbps)
    slope, slope_how = 0.0, "compute buffers taken as fixed (no two contexts measured)"
    context_pair = _context_pair(_by_variant(fit_points if memory_points is None else memory_points, engine))
    if not BUFFERS_GROW_WITH_CONTEXT.get(engine, True):
        slope_how = "working memory independent of the context (it follows the tokens of each forward pass)"
    elif context_pair is not None:
        low, high = context_pair
        shape = shapes[low.name]
        grow = (high.model_rss_mib - low.model_rss_mib) * 2**20 - (kv_held(high, shape) - kv_held(low, shape))
        cells = _pad(high.context, LLAMACPP_KV_PAD) - _pad(low.context, LLAMACPP_KV_PAD)
        slope = max(0.0, grow / cells)
        slope_how = (f"compute buffers {slope / 1024:.1f} KiB per token of context (from {low.name} at contexts "
                     f"{low.context} and {high.context})")
    return EngineFit(engine=engine, bandwidth_share=share, memory_per_context_token=slope,
                     basis=f"{how}; {slope_how}", parallel_share=parallel)


def _fit_decode(by_variant: dict[str, list[Measurement]], shapes: dict[str, ModelShape],
                bandwidth_gbps: dict[int, float]) -> tuple[float, float, str]:
    varied = {name: ms for name, ms in by_variant.items() if len({m.threads for m in ms}) >= 2}
    if not varied:
        return 1.0, 1.0, "no variant measured at two thread counts: the whole read bandwidth and parallel compute " \
                         "assumed"
    parallel_grid = PARALLEL_GRID if len(varied) >= 2 else [1.0]
    rows = [(m, 1 / m.decode_tps, bytes_per_token(shapes[m.name], decode_position(m), m.engine)
             / (bandwidth_gbps[m.threads] * 1e9)) for ms in varied.values() for m in ms]
    best = (float("inf"), 1.0, 1.0)
    for share in SHARE_GRID:
        for parallel in parallel_grid:
            error = 0.0
            for ms in varied.values():
                factors = [(1 - parallel + parallel / m.threads) for m in ms]
                rests = [t - d / share for m, t, d in rows if m in ms]
                compute = max(0.0, sum(f * r for f, r in zip(factors, rests, strict=True))
                              / sum(f * f for f in factors))
                error += sum(((compute * f + d / share) / t - 1) ** 2
                             for f, (m, t, d) in zip(factors, [r for r in rows if r[0] in ms], strict=True))
            if error < best[0] - 1e-12:
                best = (error, share, parallel)
    _, share, parallel = best
    names = " and ".join(varied)
    threads = sorted({m.threads for ms in varied.values() for m in ms})
    assumed = "" if len(varied) >= 2 else " (compute assumed parallel: one variant cannot tell)"
    return share, parallel, (f"decode reaches {share:.2f} of the read bandwidth and compute is {parallel:.0%} "
                             f"parallel{assumed} (fitted on {names} at {' and '.join(map(str, threads))} threads)")


def _context_pair(by_variant: dict[str, list[Measurement]]) -> tuple[Measurement, Measurement] | None:
    for ms in by_variant.values():
        for a in ms:
            for b in ms:
                if a.threads == b.threads and _pad(b.context, LLAMACPP_KV_PAD) > _pad(a.context, LLAMACPP_KV_PAD):
                    return a, b
    return None


def target_bandwidth_gbps(target: TargetProfile) -> float | None:
    return target.memory_bandwidth_gbps * ACHIEVABLE_SHARE_OF_SPEC if target.memory_bandwidth_gbps else None


def _error_words(fit: EngineFit) -> str:
    if fit.decode_error is None:
        return "no held-out check on this machine"
    return (f"held-out error on this machine: decode ±{fit.decode_error:.0%}, memory ±{fit.memory_error:.0%}; not "
            "validated on the target itself")


def predict(m: Measurement, shape: ModelShape, fit: EngineFit, bandwidth_here_gbps: float, target: TargetProfile,
            context: int) -> Prediction:
    """A measured variant on a target we are not on."""
    memory = predict_memory_bytes(m, shape, fit, context)
    kv = engine_kv_bytes(shape, m.engine, context)
    memory_words = (f"memory = {m.model_rss_mib:.0f} MiB measured here at context {m.context}, moved to {context} "
                    f"tokens (KV cache {kv / 2**20:.0f} MiB, {fit.memory_per_context_token / 1024:.1f} KiB of compute "
                    "buffers per token of context)")
    bandwidth = target_bandwidth_gbps(target)
    if target.accelerator in GPU_ACCELERATORS:
        decode = None
        roofline = f"{target.memory_bandwidth_gbps * 1e9 / bytes_per_token(shape, decode_position(m), m.engine):.0f}" \
            if target.memory_bandwidth_gbps else "unknown"
        decode_words = (f"decode: not predictable from this machine's CPU, since the bundle runs on the target's "
                        f"{target.accelerator} GPU (GPU decode of a small model is bound by kernel launches as much "
                        f"as by bandwidth); the data sheet's bandwidth bounds it at {roofline} t/s at most; measure "
                        "it there with --measure-on ssh://…")
        memory_words += ", with the CPU engine's buffers measured here taken as the GPU's"
    elif bandwidth is None:
        decode, decode_words = None, "decode: not predictable, the profile gives no memory bandwidth"
    else:
        decode = predict_decode_tps(m, shape, fit, target.cpu_cores, bandwidth, bandwidth_here_gbps)
        compute = compute_seconds(m, shape, fit, bandwidth_here_gbps) * compute_factor(fit, target.cpu_cores)
        decode_words = (f"decode = 1 / ({compute * 1000:.1f} ms of compute (measured here, at {target.cpu_cores} "
                        f"cores) + {bytes_per_token(shape, decode_position(m), m.engine) / 2**20:.0f} MiB read per "
                        "token / "
                        f"({fit.bandwidth_share:.2f} x {target.memory_bandwidth_gbps:g} GB/s data sheet x "
                        f"{ACHIEVABLE_SHARE_OF_SPEC} achievable)); assumes the target's cores compute as fast as this "
                        f"machine's; {fit.basis}")
    basis = f"prediction: {memory_words}; {decode_words}; {_error_words(fit)}"
    return Prediction(variant=m.name, target=target.name, engine=m.engine, memory_bytes=memory,
                      fits=memory <= target.memory_budget_gib * 2**30, decode_tps=decode, prefill_tps=None,
                      basis=basis, decode_error=fit.decode_error, memory_error=fit.memory_error)
