"""The registered ONNX converter: kinds onnx-fp32 (optimum-onnx export), onnx-int8 and onnx-int4 (onnxruntime's
quantizers), each a directory DIR/<kind>/ with model.onnx, config and tokenizer."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from converters.onnx.export import export_onnx_fp32
from converters.onnx.quantize import quantize_int4, quantize_int8
from converters.registry import ConvertOptions
from edgepack.core.artifacts import Variant
from edgepack.core.cpu import int8_isa
from edgepack.core.fileio import refuse_existing, sha256_file
from edgepack.core.progress import say
from edgepack.core.versions import library_versions, package_version

KINDS = ("onnx-fp32", "onnx-int8", "onnx-int4")


def directory_variant(kind: str, path: Path, converter: str) -> Variant:
    """A directory variant: its files, their total size, and one sha256 over the sorted (name, sha256) list."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(path).as_posix()}  {sha256_file(p)}\n" for p in files)
    return Variant(kind=kind, path=path, files=tuple(p.relative_to(path).as_posix() for p in files),
                   bytes=sum(p.stat().st_size for p in files),
                   sha256=hashlib.sha256(listing.encode()).hexdigest(), converter=converter,
                   library_versions=library_versions(("optimum-onnx", "onnxruntime", "onnx", "transformers",
                                                      "torch")))


class OnnxConverter:
    name = "onnx"
    default_kinds = KINDS
    engines = ("onnxrt",)

    def describe_kinds(self) -> str:
        return ", ".join(KINDS)

    def handles(self, kind: str) -> bool:
        return kind in KINDS

    def cache_options(self, kind: str, options: ConvertOptions) -> dict[str, Any]:
        relevant: dict[str, Any] = {"allow_pickle": options.allow_pickle}
        if kind == "onnx-int8":
            relevant["int8_isa"] = options.int8_isa
        if kind == "onnx-int4":
            relevant["int4_block_size"] = options.int4_block_size
        return relevant

    def convert(self, model_path: Path, kinds: list[str], out_dir: Path, options: ConvertOptions) -> list[Variant]:
        for kind in kinds:
            refuse_existing(out_dir / kind, options.force)
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
