"""The importance matrix computed on our side: its sums against activations captured separately, its GGUF file read
back with gguf-py, its names against the converted GGUF, and what it does to quantization (a different file,
lower importance-weighted rounding error and lower KL divergence against F32); the IQ kinds refuse to run
without one, and the build cache keys on it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from converters.gguf.converter import GGUF_CONVERTER, IMATRIX_FILE
from converters.gguf.from_hf import convert_hf_to_gguf
from converters.gguf.imatrix import ColumnStats, ImportanceMatrix
from converters.gguf.imatrix_collect import compute_imatrix
from converters.gguf.imatrix_file import read_imatrix, write_imatrix
from converters.gguf.quantize import quantize_gguf
from converters.hf_model import HFModelDir
from converters.registry import ConvertOptions
from edgepack.convert.stage import convert
from edgepack.core.errors import EdgepackError
from edgepack.core.gguf_file import inspect_gguf, metadata_value, open_reader
from edgepack.quality.metrics import log_softmax_rows
from edgepack.quality.reference import DEFAULT_EVAL_TEXT
from runtimes.base import LoadOptions
from runtimes.llamacpp import LlamaCppRuntime

QUIET = ConvertOptions(show_progress=False)
SHORT_TEXT = ("The lighthouse keeper counted the ships every evening. On Tuesday there were 12 fishing boats, "
              "3 ferries and one old yacht. \"Will the storm reach us tonight?\" asked the girl.")
# a Llama's linear layers and the names llama.cpp gives their weights, written out by hand
LLAMA_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}
NEW_KINDS = {"gguf-q5_k_m": "Q5_K", "gguf-q3_k_m": "Q3_K", "gguf-iq4_xs": "IQ4_XS", "gguf-iq3_m": "IQ3_S"}


def captured_sums_of_squares(model_dir, windows: list[list[int]]) -> dict[str, tuple[np.ndarray, int]]:
    """Every block linear layer's inputs, captured with forward hooks of this test's own and summed in numpy:
    GGUF name -> (per-column sum of squares, rows)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs: dict[str, list[np.ndarray]] = {}
    for layer_index, layer in enumerate(model.model.layers):
        for suffix, short in LLAMA_GGUF_NAMES.items():
            module = layer.get_submodule(suffix)
            name = f"blk.{layer_index}.{short}.weight"
            module.register_forward_hook(
                lambda mod, args, out, name=name: inputs.setdefault(name, []).append(
                    args[0].detach().numpy().reshape(-1, mod.in_features).copy()))
    with torch.no_grad():
        for ids in windows:
            model(torch.tensor([ids]), use_cache=False)
    return {name: ((np.concatenate(rows).astype(np.float64) ** 2).sum(axis=0), sum(len(r) for r in rows))
            for name, rows in inputs.items()}


def test_imatrix_file_holds_the_sums_of_squares_of_each_layers_inputs(tiny_model, tmp_path):
    model_dir = tiny_model("llama-spm")  # its tokenizer starts every text with BOS
    source = HFModelDir(model_dir)
    window = 16
    matrix = compute_imatrix(source, SHORT_TEXT, "unit test text", window=window)
    path = tmp_path / "imatrix.gguf"
    write_imatrix(matrix, path, "llama")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    body = tokenizer(SHORT_TEXT, add_special_tokens=False)["input_ids"]
    step = window - 1  # BOS, then 15 tokens of the text
    windows = [[tokenizer.bos_token_id] + body[i:i + step] for i in range(0, len(body), step)]
    tokens_run = len(body) + -(-len(body) // step)  # every text token, plus one BOS per window
    assert len(windows) >= 3 and tokens_run == sum(len(w) for w in windows)
    expected = captured_sums_of_squares(model_dir, windows)

    reader = gguf.GGUFReader(path)  # read back with gguf-py itself
    assert metadata_value(reader, "general.type") == "imatrix"
    assert metadata_value(reader, "imatrix.chunk_count") == len(windows)
    assert metadata_value(reader, "imatrix.chunk_size") == window
    assert metadata_value(reader, "imatrix.datasets") == ["unit test text"]
    tensors = {t.name: t for t in reader.tensors}
    names = {f"blk.{i}.{short}.weight" for i in range(2) for short in LLAMA_GGUF_NAMES.values()}
    assert set(tensors) == {n + ".in_sum2" for n in names} | {n + ".counts" for n in names}
    for name in names:
        sums, counts = tensors[name + ".in_sum2"], tensors[name + ".counts"]
        assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
        columns = 512 if name.endswith("ffn_down.weight") else 256  # intermediate_size, hidden_size
        assert list(sums.shape) == [columns, 1] and list(counts.shape) == [1, 1]
        assert float(np.asarray(counts.data).reshape(-1)[0]) == tokens_run == expected[name][1]
        np.testing.assert_allclose(np.asarray(sums.data).reshape(-1), expected[name][0], rtol=2e-5)

    # what the quantizer is given: in_sum2 / counts per column, as llama-quantize derives it from the file
    importances = read_imatrix(path).importances()
    assert set(importances) == names
    for name in names:
        np.testing.assert_allclose(importances[name], expected[name][0] / tokens_run, rtol=2e-5)


@pytest.mark.parametrize("name", ["phi3-spm", "gemma3-spm"])
def test_imatrix_names_are_the_converted_gguf_block_tensors(name, tiny_model, tmp_path):
    """Phi-3 stores qkv and gate_up fused; Gemma 3 ties its embeddings: either way every matrix of the blocks in
    the converted file has an entry of its input width, and nothing else does (not the output projection)."""
    model_dir = tiny_model(name)
    convert_hf_to_gguf(model_dir, tmp_path / "f32.gguf", outtype="f32", show_progress=False)
    blocks = {t.name: int(t.shape[0]) for t in open_reader(tmp_path / "f32.gguf").tensors
              if t.name.startswith("blk.") and len(t.shape) == 2}
    matrix = compute_imatrix(HFModelDir(model_dir), SHORT_TEXT, "unit test text")
    assert {n: len(s.sum_of_squares) for n, s in matrix.tensors.items()} == blocks
    if name == "phi3-spm":
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(blocks)


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    """The tiny llama as F32, Q4_K_M and the new kinds with the importance matrix (one matrix for all), and
    Q4_K_M without one."""
    root = tmp_path_factory.mktemp("imatrix-quantized")
    model_dir = tiny_model("llama-bpe")
    with_matrix = {v.kind: v for v in convert(model_dir, ["gguf-f32", "gguf-q4_k_m", *NEW_KINDS], root / "with",
                                              QUIET)}
    (without,) = convert(model_dir, ["gguf-q4_k_m"], root / "without", ConvertOptions(show_progress=False,
                                                                                        imatrix=False))
    return with_matrix, without, root


def dequantized(path) -> dict[str, np.ndarray]:
    return {t.name: dequantize(np.asarray(t.data), t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
            for t in open_reader(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2}


def mean_kld_against(reference_path, variant_path, token_ids: list[int]) -> float:
    def log_probs(path):
        runtime = LlamaCppRuntime(path, LoadOptions(context_length=512))
        try:
            return log_softmax_rows(runtime.logits(token_ids).astype(np.float64))
        finally:
            runtime.close()

    reference, variant = log_probs(reference_path), log_probs(variant_path)
    return float((np.exp(reference) * (reference - variant)).sum(axis=-1).mean())


def test_quantizing_with_the_imatrix_lowers_weighted_error_and_kld(quantized, tmp_path):
    with_matrix, without, root = quantized
    q4 = with_matrix["gguf-q4_k_m"]
    assert q4.sha256 != without.sha256
    assert "over" in metadata_value(open_reader(q4.path), "edgepack.imatrix")
    assert metadata_value(open_reader(without.path), "edgepack.imatrix") is None
    assert (root / "with" / IMATRIX_FILE).is_file() and not (root / "without" / IMATRIX_FILE).exists()

    # An importance matrix of ones switches llama.cpp to its weighted search without telling it anything about
    # the activations: the collected one must beat that too, not only no matrix at all.
    matrix = read_imatrix(root / "with" / IMATRIX_FILE)
    uniform = ImportanceMatrix({name: ColumnStats(np.ones_like(stats.sum_of_squares), 1)
                                for name, stats in matrix.tensors.items()}, 1, 1, ("ones",))
    quantize_gguf(with_matrix["gguf-f32"].path, tmp_path / "uniform.gguf", "q4_k_m", imatrix=uniform)

    # the rounding error of every block matrix, each column weighted by its mean squared input (from the file's
    # raw sums and counts), relative to the weights' own weighted size
    reader = gguf.GGUFReader(root / "with" / IMATRIX_FILE)
    raw = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in reader.tensors}
    original = dequantized(with_matrix["gguf-f32"].path)
    rounded = {"collected": dequantized(q4.path), "ones": dequantized(tmp_path / "uniform.gguf"),
               "none": dequantized(without.path)}
    names = [n[:-len(".in_sum2")] for n in raw if n.endswith(".in_sum2")]
    assert len(names) == 14
    for name in names:
        column_weight = raw[name + ".in_sum2"] / raw[name + ".counts"][0]
        size = float((original[name] ** 2 * column_weight).sum())
        error = {label: float(((original[name] - tensors[name]) ** 2 * column_weight).sum()) / size
                 for label, tensors in rounded.items()}
        assert error["collected"] < error["ones"] < error["none"], (name, error)

    # and the model's next-token distributions, on the evaluation text (not the calibration text), move less
    runtime = LlamaCppRuntime(with_matrix["gguf-f32"].path, LoadOptions(context_length=512))
    token_ids = runtime.tokenize(DEFAULT_EVAL_TEXT.read_text(encoding="utf-8"))[:512]
    runtime.close()
    kld_with = mean_kld_against(with_matrix["gguf-f32"].path, q4.path, token_ids)
    kld_without = mean_kld_against(with_matrix["gguf-f32"].path, without.path, token_ids)
    assert 0 < kld_with < kld_without, (kld_with, kld_without)


def test_new_kinds_are_made_with_the_imatrix(quantized):
    with_matrix, _, _ = quantized
    for kind, main_type in NEW_KINDS.items():
        variant = with_matrix[kind]
        assert main_type in inspect_gguf(variant.path).quant_types, (kind, inspect_gguf(variant.path).quant_types)
        reader = open_reader(variant.path)
        assert metadata_value(reader, "edgepack.quant_type") == kind.removeprefix("gguf-").upper()
        assert "over" in metadata_value(reader, "edgepack.imatrix")
    assert with_matrix["gguf-iq4_xs"].bytes < with_matrix["gguf-q4_k_m"].bytes


def ggml_gguf_reader():
    """ggml's own GGUF reader (C, in the llama.cpp build llama-cpp-python carries), through ctypes."""
    import ctypes

    import llama_cpp

    library = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not library.is_file():
        pytest.skip(f"no {library.name} in this llama-cpp-python build")
    ggml = ctypes.CDLL(str(library))

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    signatures = {"gguf_init_from_file": ([ctypes.c_char_p, InitParams], ctypes.c_void_p),
                  "gguf_free": ([ctypes.c_void_p], None),
                  "gguf_find_key": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int64),
                  "gguf_get_kv_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
                  "gguf_get_arr_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
                  "gguf_get_arr_n": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
                  "gguf_get_arr_str": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t], ctypes.c_char_p),
                  "gguf_get_val_u32": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_uint32),
                  "gguf_get_n_tensors": ([ctypes.c_void_p], ctypes.c_int64),
                  "gguf_get_tensor_name": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
                  "gguf_get_tensor_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
                  "gguf_get_tensor_size": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t)}
    for name, (arguments, result) in signatures.items():
        getattr(ggml, name).argtypes, getattr(ggml, name).restype = arguments, result
    return ggml, InitParams(no_alloc=True, ctx=None)


def test_ggmls_own_reader_finds_what_llama_quantizes_imatrix_loader_checks(quantized):
    """llama-quantize --imatrix loads a GGUF imatrix only with imatrix.datasets (an array of strings),
    imatrix.chunk_count and imatrix.chunk_size (u32), and an F32 <name>.counts beside every F32 <name>.in_sum2;
    llama_model_quantize then needs in_sum2 to be as wide as the weight's rows."""
    gguf_uint32, gguf_string, gguf_array, ggml_f32 = 4, 8, 9, 0  # gguf.h's and ggml.h's enum values
    ggml, params = ggml_gguf_reader()
    _, _, root = quantized
    context = ggml.gguf_init_from_file(str(root / "with" / IMATRIX_FILE).encode(), params)
    assert context, "ggml could not read the imatrix file"
    try:
        datasets = ggml.gguf_find_key(context, b"imatrix.datasets")
        assert datasets >= 0 and ggml.gguf_get_kv_type(context, datasets) == gguf_array
        assert ggml.gguf_get_arr_type(context, datasets) == gguf_string
        assert b"built-in calibration text" in ggml.gguf_get_arr_str(context, datasets, 0)
        for key in (b"imatrix.chunk_count", b"imatrix.chunk_size"):
            key_id = ggml.gguf_find_key(context, key)
            assert key_id >= 0 and ggml.gguf_get_kv_type(context, key_id) == gguf_uint32
            assert ggml.gguf_get_val_u32(context, key_id) > 0
        sizes = {}
        for tensor_id in range(ggml.gguf_get_n_tensors(context)):
            assert ggml.gguf_get_tensor_type(context, tensor_id) == ggml_f32
            name = ggml.gguf_get_tensor_name(context, tensor_id).decode()
            sizes[name] = ggml.gguf_get_tensor_size(context, tensor_id)
    finally:
        ggml.gguf_free(context)
    weights = {t.name: int(t.shape[0]) for t in open_reader(quantized[0]["gguf-f32"].path).tensors}
    sums = {name[:-len(".in_sum2")]: size for name, size in sizes.items() if name.endswith(".in_sum2")}
    assert len(sums) == 14 and len(sizes) == 28
    for name, size in sums.items():
        assert size == 4 * weights[name] and sizes[name + ".counts"] == 4


@pytest.mark.parametrize("kind", ["gguf-iq4_xs", "gguf-iq3_m"])
def test_iq_kinds_refuse_without_an_imatrix(kind, tiny_model, tmp_path, quantized):
    with pytest.raises(EdgepackError, match=f"{kind} needs an importance matrix.*drop --no-imatrix"):
        convert(tiny_model("llama-bpe"), ["gguf-f16", kind], tmp_path, ConvertOptions(show_progress=False,
                                                                                      imatrix=False))
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    f32 = quantized[0]["gguf-f32"].path
    with pytest.raises(EdgepackError, match="needs an importance matrix"):
        quantize_gguf(f32, tmp_path / "direct.gguf", kind.removeprefix("gguf-"))
    assert not (tmp_path / "direct.gguf").exists()


def test_a_calibration_text_of_ones_own(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tiny_model("llama-bpe")  # a tokenizer that adds no BOS: the counts are the text's tokens
    text = "Two short sentences to calibrate on. The ferry left at 09:30 with 41 passengers aboard."
    convert(model_dir, ["gguf-q3_k_m"], tmp_path, ConvertOptions(show_progress=False, calibration_text=text))
    reader = gguf.GGUFReader(tmp_path / IMATRIX_FILE)
    assert "--calibration-text" in metadata_value(reader, "imatrix.datasets")[0]
    counts = {float(np.asarray(t.data).reshape(-1)[0]) for t in reader.tensors if t.name.endswith(".counts")}
    assert counts == {len(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])}


def test_build_cache_keys_on_the_imatrix_and_its_text():
    def key(kind: str, **options) -> dict:
        return GGUF_CONVERTER.cache_options(kind, ConvertOptions(**options))

    for kind in ("gguf-q4_k_m", "gguf-q5_k_m", "gguf-iq4_xs"):
        assert key(kind) != key(kind, imatrix=False)
        assert key(kind) != key(kind, calibration_text="another text")
        assert key(kind, calibration_text="another text") == key(kind, calibration_text="another text")
    for kind in ("gguf-q8_0", "gguf-f16"):  # the imatrix changes nothing in these
        assert key(kind) == key(kind, imatrix=False) == key(kind, calibration_text="another text")
