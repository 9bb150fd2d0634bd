"""The registered ONNX converter: kinds onnx-fp32, onnx-int8 and onnx-int4, each a directory DIR/<kind>/ with
model.onnx, config, tokenizer and weights.json (what each weight became).

For the architectures our builder takes (converters/onnx/decoder_graph.py) every kind is our decode-optimized
graph, with the weights of converters/onnx/recipes.py. Any other model (an architecture optimum-onnx exports but
our builder does not express, such as a sequence-dependent rope) falls back to optimum-onnx's export and
onnxruntime's quantizers; each variant's `converter` says which exporter made it."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from converters.calibration import calibration_sha256, calibration_text
from converters.hf_model import HFModelDir
from converters.logit_parity import check_logit_parity
from converters.onnx.decoder_graph import CalibrationStats, TensorReport, write_decoder_graph
from converters.onnx.decoder_spec import NotExpressible, decoder_spec
from converters.onnx.export import export_onnx_fp32
from converters.onnx.grammar_vocab import copy_grammar_vocab, write_grammar_vocab
from converters.onnx.quantize import quantize_int4, quantize_int8
from converters.onnx.recipes import RECIPE_VERSION, plan_uses_calibration, precision_plan
from converters.registry import ConvertOptions
from edgepack.core.artifacts import Variant
from edgepack.core.cpu import int8_isa
from edgepack.core.fileio import atomic_output_dir, refuse_existing, sha256_file
from edgepack.core.onnx_folder import GRAPH_KIND, MODEL_FILE, WEIGHTS_REPORT
from edgepack.core.progress import say
from edgepack.core.versions import library_versions, package_version

KINDS = ("onnx-fp32", "onnx-int8", "onnx-int4")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def directory_variant(kind: str, path: Path, converter: str) -> Variant:
    """A directory variant: its files, their total size, and one sha256 over the sorted (name, sha256) list."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(path).as_posix()}  {sha256_file(p)}\n" for p in files)
    return Variant(kind=kind, path=path, files=tuple(p.relative_to(path).as_posix() for p in files),
                   bytes=sum(p.stat().st_size for p in files),
                   sha256=hashlib.sha256(listing.encode()).hexdigest(), converter=converter,
                   library_versions=library_versions(("optimum-onnx", "onnxruntime", "onnx", "transformers",
                                                      "torch")))


def copy_model_side_files(model_path: Path, dst: Path) -> None:
    """Config, generation config, tokenizer and chat template: every file of the model folder but its weights."""
    for path in Path(model_path).iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_FILE_SUFFIXES) and not path.name.endswith(
                ".index.json") and not path.name.startswith("."):
            shutil.copy2(path, dst / path.name)


def write_weights_report(dst: Path, plan_text: str, tensors: list[TensorReport]) -> None:
    by_precision: dict[str, int] = {}
    for tensor in tensors:
        by_precision[tensor.precision] = by_precision.get(tensor.precision, 0) + tensor.bytes
    total = sum(by_precision.values()) or 1
    report = {"graph": GRAPH_KIND, "plan": plan_text,
              "bytes_by_precision": {name: {"bytes": size, "share": size / total}
                                     for name, size in sorted(by_precision.items())},
              "tensors": [{"name": t.name, "shape": list(t.shape), "precision": t.precision, "bytes": t.bytes,
                           "rms_error": t.rms_error} for t in tensors]}
    (dst / WEIGHTS_REPORT).write_text(json.dumps(report, indent=1) + "\n")


def write_genai_config(dst: Path, model: HFModelDir, spec) -> None:
    """genai_config.json, so onnxruntime-genai's Generator can run the folder too (the graph has its interface)."""
    config = model.config
    generation = model.read_json("generation_config.json") or {}
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    decoder = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []}, "filename": MODEL_FILE,
               "head_size": spec.head_dim, "hidden_size": spec.hidden, "num_attention_heads": spec.heads,
               "num_hidden_layers": spec.layers, "num_key_value_heads": spec.kv_heads,
               "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                          "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"}}
    context = int(config.get("max_position_embeddings", 4096))
    genai = {"model": {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos,
                       "pad_token_id": config.get("pad_token_id") or (eos[0] if isinstance(eos, list) else eos),
                       "context_length": context, "decoder": decoder, "type": spec.family, "vocab_size": spec.vocab},
             "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                        "num_return_sequences": 1, "past_present_share_buffer": True, "temperature": 1.0,
                        "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0}}
    (dst / "genai_config.json").write_text(json.dumps(genai, indent=1) + "\n")


class OnnxConverter:
    name = "onnx"
    default_kinds = KINDS
    engines = ("onnxrt",)

    def describe_kinds(self) -> str:
        return ", ".join(KINDS)

    def handles(self, kind: str) -> bool:
        return kind in KINDS

    def cache_options(self, kind: str, options: ConvertOptions) -> dict[str, Any]:
        relevant: dict[str, Any] = {"allow_pickle": options.allow_pickle, "graph": GRAPH_KIND,
                                    "recipe": RECIPE_VERSION}
        if kind == "onnx-int8":
            relevant["int8_isa"] = options.int8_isa  # only the fallback's dynamic quantization reads it
        if kind == "onnx-int4":
            relevant["int4_block_size"] = options.int4_block_size
            relevant["calibration"] = calibration_sha256(options.calibration_text) if options.imatrix else None
        return relevant

    def convert(self, model_path: Path, kinds: list[str], out_dir: Path, options: ConvertOptions) -> list[Variant]:
        for kind in kinds:
            refuse_existing(out_dir / kind, options.force)
        model = HFModelDir(model_path, allow_pickle=options.allow_pickle)
        try:
            spec = decoder_spec(model)
        except NotExpressible as why:
            say(f"our ONNX graph cannot express {Path(model_path).name}: {why}; exporting with optimum-onnx")
            return self._convert_with_optimum(model_path, kinds, out_dir, options)
        return self._convert_decoder_graph(model, spec, kinds, out_dir, options)

    # -- our graph ------------------------------------------------------------------------------

    def _convert_decoder_graph(self, model: HFModelDir, spec, kinds: list[str], out_dir: Path,
                               options: ConvertOptions) -> list[Variant]:
        exporter = (f"edgepack decoder graph (onnx {package_version('onnx')}, "
                    f"onnxruntime {package_version('onnxruntime')})")
        plans = {kind: precision_plan(kind, options.int4_block_size, options.imatrix) for kind in kinds}
        variants: list[Variant] = []
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-base.") as scratch:
            # the float32 graph is built (and checked against transformers) whatever kinds are asked for: the
            # quantized graphs are the same graph with other weights
            fp32 = out_dir / "onnx-fp32" if "onnx-fp32" in kinds else Path(scratch) / "onnx-fp32"
            say(f"building our ONNX graph of {model.path.name} ({spec.family}, {spec.layers} layers)")
            with atomic_output_dir(fp32) as tmp:
                tensors = write_decoder_graph(model, spec, precision_plan("onnx-fp32"), tmp / MODEL_FILE)
                copy_model_side_files(model.path, tmp)
                write_weights_report(tmp, precision_plan("onnx-fp32").describe(), tensors)
                write_genai_config(tmp, model, spec)
                write_grammar_vocab(model.path, tmp)
                parity = check_logit_parity(tmp, model.path)
            say(f"onnx-fp32: logit parity ok (max |diff| {parity.max_abs_diff:.2e} over {parity.positions} "
                f"positions, argmax agreement {parity.argmax_agreement:.0%})")
            if "onnx-fp32" in kinds:
                variants.append(directory_variant("onnx-fp32", fp32, exporter))
            calibration = self._calibration(model, [plans[k] for k in kinds if k != "onnx-fp32"], options)
            for kind in kinds:
                if kind == "onnx-fp32":
                    continue
                plan = plans[kind]
                say(f"{kind}: {plan.describe()}")
                with atomic_output_dir(out_dir / kind) as tmp:
                    tensors = write_decoder_graph(model, spec, plan, tmp / MODEL_FILE, calibration)
                    copy_model_side_files(model.path, tmp)
                    write_weights_report(tmp, plan.describe(), tensors)
                    write_genai_config(tmp, model, spec)
                    copy_grammar_vocab(fp32, tmp)
                variants.append(directory_variant(kind, out_dir / kind, f"{exporter}: {plan.describe()}"))
        return variants

    def _calibration(self, model: HFModelDir, plans, options: ConvertOptions) -> CalibrationStats | None:
        if not any(plan_uses_calibration(plan) for plan in plans):
            return None
        from converters.gguf.imatrix_collect import compute_column_importance

        say("reading the calibration text through the model (each linear layer's column importance)")
        return CalibrationStats(compute_column_importance(model, calibration_text(options.calibration_text)))

    # -- optimum-onnx's export, for what our graph cannot express -------------------------------

    def _convert_with_optimum(self, model_path: Path, kinds: list[str], out_dir: Path,
                              options: ConvertOptions) -> list[Variant]:
        exporter = f"optimum-onnx {package_version('optimum-onnx')} export ({package_version('onnxruntime')})"
        variants: list[Variant] = []
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-base.") as scratch:
            fp32 = out_dir / "onnx-fp32" if "onnx-fp32" in kinds else Path(scratch) / "onnx-fp32"
            say(f"exporting {Path(model_path).name} to ONNX FP32 with optimum-onnx")
            parity = export_onnx_fp32(model_path, fp32, force=options.force)
            say(f"onnx-fp32: logit parity ok (max |diff| {parity.max_abs_diff:.2e} over {parity.positions} "
                f"positions, argmax agreement {parity.argmax_agreement:.0%})")
            if "onnx-fp32" in kinds:
                variants.append(directory_variant("onnx-fp32", fp32, exporter))
            if "onnx-int8" in kinds:
                isa = options.int8_isa or int8_isa()
                setting = quantize_int8(fp32, out_dir / "onnx-int8", isa, force=options.force)
                say(f"onnx-int8: dynamic quantization for {isa} ({setting.why})")
                variants.append(directory_variant("onnx-int8", out_dir / "onnx-int8",
                                                  f"{exporter} + onnxruntime quantize_dynamic ({isa})"))
            if "onnx-int4" in kinds:
                quantize_int4(fp32, out_dir / "onnx-int4", block_size=options.int4_block_size, force=options.force)
                say(f"onnx-int4: MatMulNBits, 4 bits, block size {options.int4_block_size}")
                variants.append(directory_variant(
                    "onnx-int4", out_dir / "onnx-int4",
                    f"{exporter} + onnxruntime MatMulNBits (4 bit, block {options.int4_block_size})"))
        return variants


ONNX_CONVERTER = OnnxConverter()
