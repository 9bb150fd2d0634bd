"""Predict what a variant needs and how fast it decodes on a target we are not on.

memory = weights + KV cache (2 x layers x kv heads x head dim x context x dtype bytes) + the engine's runtime
overhead measured on this host. decode t/s = efficiency x achievable bandwidth / bytes read per token, where the
efficiency is calibrated from this host's own measurement of that engine (measured decode against the roofline of
the measured bandwidth). Every Prediction carries the basis it rests on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgepack.core.errors import EdgepackError
from edgepack.measure.profiler import Measurement
from edgepack.measure.targets import TargetProfile

# On targets we have only the data-sheet bandwidth; a copy benchmark typically reaches about this share of it.
ACHIEVABLE_SHARE_OF_SPEC = 0.7
KV_BYTES = {"llamacpp": 2, "onnxrt": 4, "torch": 4}  # f16 KV cache in llama.cpp, f32 in our ONNX export
# How an engine's memory beyond weights + KV cache behaves: llama.cpp memory-maps the weights, so its overhead
# (compute buffers, the library) is roughly fixed; ONNX Runtime keeps its own prepacked copy of the MatMul weights,
# so its overhead grows with them (measured on the demo student: fp32 +650 MiB over 518 MiB of weights).
OVERHEAD_SCALES_WITH_WEIGHTS = {"llamacpp": False, "onnxrt": True, "torch": False}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    weight_bytes: int


@dataclass(frozen=True)
class EngineCalibration:
    engine: str
    efficiency: float  # measured decode / roofline decode, on this host
    overhead_bytes: int  # measured model RSS - weights - KV cache, on the calibration variant
    overhead_per_weight_byte: float  # the same, per byte of weights (used where the overhead scales with them)
    host_bandwidth_gbps: float
    from_variant: str

    def overhead_for(self, weight_bytes: int) -> int:
        if OVERHEAD_SCALES_WITH_WEIGHTS.get(self.engine, False):
            return int(self.overhead_per_weight_byte * weight_bytes)
        return self.overhead_bytes


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


def model_shape(path: Path) -> ModelShape:
    path = Path(path)
    if path.is_file():
        from edgepack.core.gguf_file import metadata_value, open_reader

        reader = open_reader(path)
        arch = metadata_value(reader, "general.architecture")
        heads = int(metadata_value(reader, f"{arch}.attention.head_count"))
        head_dim = metadata_value(reader, f"{arch}.attention.key_length") or \
            int(metadata_value(reader, f"{arch}.embedding_length")) // heads
        return ModelShape(layers=int(metadata_value(reader, f"{arch}.block_count")),
                          kv_heads=int(metadata_value(reader, f"{arch}.attention.head_count_kv", heads)),
                          head_dim=int(head_dim), weight_bytes=sum(int(t.n_bytes) for t in reader.tensors))
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EdgepackError(f"{path}: cannot read the model's shape (no GGUF metadata, no config.json)")
    config = json.loads(config_path.read_text())
    heads = int(config["num_attention_heads"])
    weights = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.onnx") or f.suffix ==
                  ".safetensors")
    return ModelShape(layers=int(config["num_hidden_layers"]),
                      kv_heads=int(config.get("num_key_value_heads") or heads),
                      head_dim=int(config.get("head_dim") or config["hidden_size"] // heads), weight_bytes=weights)


def kv_cache_bytes(shape: ModelShape, context: int, dtype_bytes: int) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * context * dtype_bytes


def bytes_per_token(shape: ModelShape, context: int, engine: str) -> int:
    """Decoding one token reads every weight once and the KV cache of the positions so far (taken as full)."""
    return shape.weight_bytes + kv_cache_bytes(shape, context, KV_BYTES.get(engine, 4))


def calibrate(measurement: Measurement, host_bandwidth_gbps: float, shape: ModelShape | None = None
              ) -> EngineCalibration:
    """`shape`: the variant's, when already known (reading a GGUF's metadata takes seconds)."""
    shape = shape or model_shape(measurement.path)
    per_token = bytes_per_token(shape, measurement.prompt_tokens + measurement.new_tokens // 2, measurement.engine)
    roofline = host_bandwidth_gbps * 1e9 / per_token
    kv = kv_cache_bytes(shape, measurement.context, KV_BYTES.get(measurement.engine, 4))
    overhead = max(0, int(measurement.model_rss_mib * 2**20) - shape.weight_bytes - kv)
    return EngineCalibration(engine=measurement.engine, efficiency=measurement.decode_tps / roofline,
                             overhead_bytes=overhead, overhead_per_weight_byte=overhead / shape.weight_bytes,
                             host_bandwidth_gbps=host_bandwidth_gbps, from_variant=measurement.name)


def predict(path: Path, engine: str, target: TargetProfile, calibration: EngineCalibration, context: int,
            target_bandwidth_gbps: float | None = None, shape: ModelShape | None = None) -> Prediction:
    """`target_bandwidth_gbps`: a measured figure (the host); otherwise the profile's, scaled to what is
    achievable."""
    shape = shape or model_shape(path)
    overhead = calibration.overhead_for(shape.weight_bytes)
    memory = shape.weight_bytes + kv_cache_bytes(shape, context, KV_BYTES.get(engine, 4)) + overhead
    if target_bandwidth_gbps is not None:
        bandwidth, how = target_bandwidth_gbps, f"measured bandwidth {target_bandwidth_gbps:.1f} GB/s"
    elif target.memory_bandwidth_gbps:
        bandwidth = target.memory_bandwidth_gbps * ACHIEVABLE_SHARE_OF_SPEC
        how = (f"data-sheet bandwidth {target.memory_bandwidth_gbps:g} GB/s x {ACHIEVABLE_SHARE_OF_SPEC} "
               "achievable")
    else:
        bandwidth, how = None, "no bandwidth known for the target"
    per_token = bytes_per_token(shape, context // 2, engine)
    decode = calibration.efficiency * bandwidth * 1e9 / per_token if bandwidth else None
    kv = kv_cache_bytes(shape, context, KV_BYTES.get(engine, 4))
    basis = (f"prediction: memory = weights {shape.weight_bytes / 2**20:.0f} MiB + KV cache {kv / 2**20:.0f} MiB at "
             f"{context} tokens + "
             f"{engine} overhead {overhead / 2**20:.0f} MiB (from {calibration.from_variant} measured on this host); "
             "decode = "
             f"{calibration.efficiency:.2f} (efficiency of {engine} measured here on {calibration.from_variant}) x "
             f"{how} / {per_token / 2**20:.0f} MiB read per token; prefill: no compute figure in the profile")
    if target.accelerator != "none":
        basis += f"; assumes the {target.accelerator} runs it with the efficiency measured on this host's CPU"
    return Prediction(variant=path.stem if path.is_file() else path.name, target=target.name, engine=engine,
                      memory_bytes=memory, fits=memory <= target.memory_budget_gib * 2**30, decode_tps=decode,
                      prefill_tps=None, basis=basis)
