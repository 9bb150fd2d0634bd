"""The profiler on tiny models, and the prediction arithmetic against hand-computed values."""

from __future__ import annotations

from dataclasses import replace

import pytest

from converters.registry import ConvertOptions
from edgepack.measure.bandwidth import measure_bandwidth_gbps
from edgepack.measure.predict import ModelShape, bytes_per_token, calibrate, kv_cache_bytes, model_shape, predict
from edgepack.measure.profiler import ProfileOptions, profile
from edgepack.measure.targets import resolve_target

QUIET = ConvertOptions(show_progress=False)


def test_kv_cache_arithmetic_for_known_shapes():
    smollm2 = ModelShape(layers=30, kv_heads=3, head_dim=64, weight_bytes=0)
    assert kv_cache_bytes(smollm2, 2048, 2) == 2 * 30 * 3 * 64 * 2048 * 2 == 47_185_920
    llama3_8b = ModelShape(layers=32, kv_heads=8, head_dim=128, weight_bytes=0)
    assert kv_cache_bytes(llama3_8b, 8192, 2) == 1_073_741_824  # 1 GiB at 8k context in f16
    assert bytes_per_token(replace(llama3_8b, weight_bytes=1000), 0, "llamacpp") == 1000


def test_model_shape_from_gguf_and_onnx(tiny_variants):
    gguf = model_shape(tiny_variants["gguf-f16"])
    onnx = model_shape(tiny_variants["onnx-fp32"])
    assert (gguf.layers, gguf.kv_heads, gguf.head_dim) == (2, 2, 64) == (onnx.layers, onnx.kv_heads, onnx.head_dim)
    assert 0.4 < gguf.weight_bytes / onnx.weight_bytes < 0.6  # f16 against f32


def test_profiler_returns_sane_positive_figures(tiny_variants):
    options = ProfileOptions(threads=1, prompt_tokens=32, new_tokens=8, runs=2, show_progress=False)
    result = profile([tiny_variants["gguf-q8_0"], tiny_variants["onnx-fp32"]], options)
    assert result.memory_bandwidth_gbps > 0.5
    for measurement in result.variants:
        assert measurement.threads == 1 and measurement.runs == 2
        assert 0 < measurement.load_s < 60 and measurement.peak_rss_mib > measurement.model_rss_mib > 0
        assert measurement.prefill_tps > 0 and measurement.decode_tps_min <= measurement.decode_tps
        assert measurement.decode_tps <= measurement.decode_tps_max and measurement.ttft_s > 0
    assert {m.engine for m in result.variants} == {"llamacpp", "onnxrt"}


def test_prediction_rests_on_the_calibration(tiny_variants):
    result = profile([tiny_variants["gguf-f16"]], ProfileOptions(threads=1, prompt_tokens=32, new_tokens=8, runs=2,
                                                              show_progress=False))
    calibration = calibrate(result.variants[0], result.memory_bandwidth_gbps)
    assert calibration.efficiency > 0
    pi = resolve_target("raspberry-pi-5-8gb")
    jetson = resolve_target("jetson-orin-nano-8gb")
    on_pi = predict(tiny_variants["gguf-q8_0"], "llamacpp", pi, calibration, context=512)
    on_jetson = predict(tiny_variants["gguf-q8_0"], "llamacpp", jetson, calibration, context=512)
    assert on_pi.is_prediction and on_pi.basis.startswith("prediction:") and on_pi.fits
    # same model and engine: the decode prediction scales with the targets' bandwidth
    assert on_jetson.decode_tps / on_pi.decode_tps == pytest.approx(68 / 17.1, rel=1e-6)
    shape = model_shape(tiny_variants["gguf-q8_0"])
    fixed = calibration.overhead_bytes  # llama.cpp: a fixed overhead
    assert on_pi.memory_bytes == shape.weight_bytes + kv_cache_bytes(shape, 512, 2) + fixed
    small = replace(pi, memory_budget_gib=on_pi.memory_bytes / 2**30 / 2)
    assert not predict(tiny_variants["gguf-q8_0"], "llamacpp", small, calibration, context=512).fits


def test_bandwidth_benchmark_is_positive():
    assert measure_bandwidth_gbps(1, mib_per_thread=16, rounds=2) > 0.5


def test_engine_overhead_model():
    from edgepack.measure.predict import EngineCalibration

    onnx = EngineCalibration("onnxrt", 0.5, overhead_bytes=600, overhead_per_weight_byte=1.2,
                             host_bandwidth_gbps=20, from_variant="onnx-fp32")
    gguf = replace(onnx, engine="llamacpp")
    assert onnx.overhead_for(100) == 120  # ONNX Runtime's prepacked copy grows with the weights
    assert gguf.overhead_for(100) == 600  # llama.cpp memory-maps its weights: a fixed overhead
