"""The profiler on tiny models, and the prediction arithmetic against hand-computed values."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from converters.registry import ConvertOptions
from edgepack.measure.bandwidth import measure_bandwidth_gbps
from edgepack.measure.predict import (
    ModelShape,
    bytes_per_token,
    fit_engine,
    kv_cache_bytes,
    model_shape,
    predict,
    predict_decode_tps,
    predict_memory_bytes,
)
from edgepack.measure.profiler import Measurement, ProfileOptions, profile
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


def _measurement(name: str, threads: int, tps: float, context: int = 256, rss_mib: float = 100.0,
                 engine: str = "llamacpp") -> Measurement:
    return Measurement(name=name, path=Path(name), engine=engine, threads=threads, context=context, prompt_tokens=16,
                       new_tokens=8, runs=1, load_s=0.1, peak_rss_mib=rss_mib + 50, model_rss_mib=rss_mib,
                       engine_memory_mib=rss_mib, ttft_s=0.1, prefill_tps=100, decode_tps=tps, decode_tps_min=tps,
                       decode_tps_max=tps)


# a model with no KV cache to speak of: 1 GB of weights; made-up machine: 10 GB/s read at 1 thread, 16 at 2
NO_KV = ModelShape(layers=1, kv_heads=0, head_dim=64, weight_bytes=10**9)
BANDWIDTH = {1: 10.0, 2: 16.0}


def test_the_fit_recovers_the_share_and_compute_that_made_the_figures():
    # by hand: share 0.5 and 0.02 core-seconds of compute give 0.02 + 1e9 / (0.5 x 10e9) = 0.22 s a token at 1
    # thread and 0.01 + 1e9 / (0.5 x 16e9) = 0.135 s at 2
    points = [_measurement("v", 1, 1 / 0.22), _measurement("v", 2, 1 / 0.135)]
    fit = fit_engine("llamacpp", points, {"v": NO_KV}, BANDWIDTH)
    assert fit.bandwidth_share == pytest.approx(0.5)
    # 4 threads at 20 GB/s: 1 / (0.02 / 4 + 1e9 / (0.5 x 20e9)) = 1 / 0.105
    assert predict_decode_tps(points[1], NO_KV, fit, 4, 20.0, BANDWIDTH[2]) == pytest.approx(1 / 0.105)


def test_two_variants_at_two_thread_counts_tell_the_share_from_how_compute_scales():
    # made with share 0.6 and compute 40% parallel: t = c x (0.6 + 0.4 / T) + bytes / (0.6 x bandwidth_T)
    def seconds(compute: float, weight_bytes: float, threads: int) -> float:
        return compute * (0.6 + 0.4 / threads) + weight_bytes / (0.6 * BANDWIDTH[threads] * 1e9)

    small = replace(NO_KV, weight_bytes=5 * 10**8)
    points = [_measurement(name, threads, 1 / seconds(compute, shape.weight_bytes, threads))
              for name, compute, shape in (("big", 0.05, NO_KV), ("small", 0.08, small)) for threads in (1, 2)]
    fit = fit_engine("llamacpp", points, {"big": NO_KV, "small": small}, BANDWIDTH)
    assert (fit.bandwidth_share, fit.parallel_share) == (pytest.approx(0.6), pytest.approx(0.4))
    # a third variant measured at 2 threads only, predicted at 1: 0.02 x 1 + 2e8 / (0.6 x 10e9)
    third = replace(NO_KV, weight_bytes=2 * 10**8)
    measured = _measurement("third", 2, 1 / seconds(0.02, third.weight_bytes, 2))
    assert predict_decode_tps(measured, third, fit, 1, BANDWIDTH[1], BANDWIDTH[2]) == pytest.approx(
        1 / (0.02 + 2e8 / 6e9))


def test_a_paired_variant_is_fitted_on_its_pair_and_its_memory_on_processes_of_its_own():
    # the same made-up machine as above (share 0.6, compute 40% parallel); "big" and "small" were measured at 2 and 1
    # threads in one process each (the pair, exact), and on their own at 2 threads in a moment when the machine ran
    # 25% slower (their main measurements): the fit must read the pairs, and so recover 0.6 and 0.4 exactly
    from edgepack.measure.on_target import FitRun, fit_engines

    def seconds(compute: float, weight_bytes: float, threads: int) -> float:
        return compute * (0.6 + 0.4 / threads) + weight_bytes / (0.6 * BANDWIDTH[threads] * 1e9)

    small = replace(NO_KV, weight_bytes=5 * 10**8)
    shapes = {"big": NO_KV, "small": small}
    computes = {"big": 0.05, "small": 0.08}
    main = [_measurement(name, 2, 0.8 / seconds(computes[name], shapes[name].weight_bytes, 2), rss_mib=300)
            for name in shapes]
    extra = [(FitRun(name, threads, 256, "pair"), _measurement(name, threads, 1 / seconds(
              computes[name], shapes[name].weight_bytes, threads), rss_mib=200))
             for name in shapes for threads in (2, 1)]
    # the largest at another context, in a process of its own: 8 MiB more at 4 x the context, no KV cache, so 8 MiB
    # of compute buffers over 768 more cells
    extra.append((FitRun("big", 2, 1024, "fit"), _measurement("big", 2, 1.0, context=1024, rss_mib=308)))
    fit = fit_engines(main, extra, shapes, BANDWIDTH)["llamacpp"]
    assert (fit.bandwidth_share, fit.parallel_share) == (pytest.approx(0.6), pytest.approx(0.4))
    assert fit.memory_per_context_token == pytest.approx(8 * 2**20 / 768)


def test_a_thread_pair_is_measured_in_one_process(tiny_variants):
    from edgepack.measure.profiler import measure_thread_pair

    options = ProfileOptions(threads=2, prompt_tokens=32, new_tokens=8, runs=2, show_progress=False)
    first, second = measure_thread_pair(tiny_variants["onnx-fp32"], options, 1)
    assert (first.threads, second.threads) == (2, 1) and first.runs == second.runs == 2
    assert first.peak_rss_mib == second.peak_rss_mib  # one process, both runtimes in it
    for m in (first, second):
        assert m.engine == "onnxrt" and m.decode_tps > 0 and 0 < m.model_rss_mib < m.peak_rss_mib


def test_the_share_never_exceeds_the_read_bandwidth():
    # faster than the kernel's bandwidth allows at both thread counts (weights in cache): bounded at 1
    points = [_measurement("v", 1, 20.0), _measurement("v", 2, 40.0)]
    assert fit_engine("llamacpp", points, {"v": NO_KV}, BANDWIDTH).bandwidth_share == 1.0


def test_memory_moves_with_the_kv_cache_and_the_fitted_compute_buffers():
    smollm2 = ModelShape(layers=30, kv_heads=3, head_dim=64, weight_bytes=100 * 2**20)
    kv_per_cell = 2 * 30 * 3 * 64 * 2  # f16 K and V of every layer
    # 1024 more cells of context add their KV cache and, by construction here, 8 KiB of buffers per cell
    low = _measurement("v", 2, 50, context=256, rss_mib=200.0)
    high = _measurement("v", 2, 50, context=1280, rss_mib=200.0 + (1024 * kv_per_cell + 1024 * 8192) / 2**20)
    fit = fit_engine("llamacpp", [low, high], {"v": smollm2}, BANDWIDTH)
    assert fit.memory_per_context_token == pytest.approx(8192)
    at_4096 = 200 * 2**20 + (4096 - 256) * (kv_per_cell + 8192)
    assert predict_memory_bytes(low, smollm2, fit, 4096) == pytest.approx(at_4096, abs=2)
    # ONNX Runtime grows its cache with the tokens held: 24 tokens at the measurement (f32), 4096 in a full context
    onnx = _measurement("o", 2, 50, context=256, rss_mib=300.0, engine="onnxrt")
    onnx_fit = fit_engine("onnxrt", [onnx], {"o": smollm2}, BANDWIDTH)
    assert predict_memory_bytes(onnx, smollm2, onnx_fit, 4096) == pytest.approx(
        300 * 2**20 + (4096 - 24) * kv_per_cell * 2, abs=2)


def test_sliding_window_layers_hold_a_window_of_kv_in_llama_cpp():
    # Gemma 3 270M's shape: 18 layers, every sixth global (3 of them), window 512, 1 KV head of 256, f16
    gemma = ModelShape(layers=18, kv_heads=1, head_dim=256, weight_bytes=0, sliding_window=512, sliding_layers=15)
    per_cell = 2 * 1 * 256 * 2
    # global layers: 4096 cells; sliding ones: min(4096, 512 + 512 micro-batch) = 1024 cells
    assert kv_cache_bytes(gemma, 4096, 2, sliding=True) == (3 * 4096 + 15 * 1024) * per_cell == 28_311_552
    assert kv_cache_bytes(gemma, 4096, 2) == 18 * 4096 * per_cell  # ONNX/torch: every layer holds the context


def test_a_cpu_target_is_predicted_and_a_gpu_target_is_not_predicted_from_a_cpu():
    points = [_measurement("v", 1, 1 / 0.22), _measurement("v", 2, 1 / 0.135)]
    fit = fit_engine("llamacpp", points, {"v": NO_KV}, BANDWIDTH)
    pi = resolve_target("raspberry-pi-5-8gb")
    on_pi = predict(points[1], NO_KV, fit, BANDWIDTH[2], pi, context=512)
    # 4 cores, 17.1 GB/s data sheet x 0.7: 1 / (0.02 / 4 + 1e9 / (0.5 x 11.97e9))
    assert on_pi.decode_tps == pytest.approx(1 / (0.005 + 1e9 / (0.5 * 17.1 * 0.7 * 1e9)))
    assert on_pi.is_prediction and on_pi.basis.startswith("prediction:") and "held-out" in on_pi.basis
    for name in ("cuda-rtx4090-24gb", "jetson-orin-nano-8gb"):
        gpu = predict(points[1], NO_KV, fit, BANDWIDTH[2], resolve_target(name), context=512)
        assert gpu.decode_tps is None and "not predictable from this machine's CPU" in gpu.basis
    rtx = predict(points[1], NO_KV, fit, BANDWIDTH[2], resolve_target("cuda-rtx4090-24gb"), context=512)
    assert "bounds it at 1008 t/s at most" in rtx.basis  # 1008 GB/s / 1 GB a token
    assert rtx.memory_bytes == pytest.approx(100 * 2**20, abs=2) and rtx.fits


def test_bandwidth_benchmark_is_positive():
    assert measure_bandwidth_gbps(1, mib_per_thread=16, rounds=2) > 0.5
