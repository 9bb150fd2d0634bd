"""The registered GGUF converter: kinds gguf-f32/f16/bf16 (our converter) and gguf-<quant> (llama.cpp's quantizer,
weighted by an importance matrix computed here unless options.imatrix is off)."""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from converters.architectures import architecture_for_config
from converters.calibration import BUILTIN_CALIBRATION_NAME, calibration_sha256, calibration_text
from converters.gguf.from_hf import CONVERTER_NAME, FLOAT_OUTPUT_TYPES, convert_hf_to_gguf
from converters.gguf.imatrix import ImportanceMatrix
from converters.gguf.imatrix_collect import CALIBRATION_WINDOW, compute_imatrix
from converters.gguf.imatrix_file import read_imatrix, write_imatrix
from converters.gguf.parity import check_logit_parity, check_tokenizer_parity
from converters.gguf.quantize import (
    quant_types,
    quantize_gguf,
    quantizer_name,
    refuse_missing_imatrix,
    uses_imatrix,
)
from converters.hf_model import HFModelDir
from converters.registry import ConvertOptions
from edgepack.core.artifacts import Variant
from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import refuse_existing, sha256_file
from edgepack.core.gguf_file import inspect_gguf
from edgepack.core.progress import say
from edgepack.core.versions import library_versions

PREFIX = "gguf-"
# the lossless float type to quantize from, by the dtype the HF weights are stored in
_LOSSLESS_BASE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
IMATRIX_FILE = "imatrix.gguf"  # written beside the variants, in llama.cpp's format (llama-quantize --imatrix)


def gguf_path(out_dir: Path, kind: str) -> Path:
    return out_dir / f"{kind}.gguf"


class GGUFConverter:
    name = "gguf"
    default_kinds = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m")
    engines = ("llamacpp",)

    def describe_kinds(self) -> str:
        return ("gguf-f32, gguf-f16, gguf-bf16, gguf-<llama.cpp type> (e.g. gguf-q8_0, gguf-q5_k_m, gguf-q4_k_m, "
                "gguf-q3_k_m, gguf-iq4_xs, gguf-iq3_m)")

    def handles(self, kind: str) -> bool:
        if not kind.startswith(PREFIX):
            return False
        suffix = kind[len(PREFIX):]
        return suffix in FLOAT_OUTPUT_TYPES or suffix in quant_types()

    def cache_options(self, kind: str, options: ConvertOptions) -> dict[str, Any]:
        relevant: dict[str, Any] = {"allow_pickle": options.allow_pickle}
        if _takes_imatrix(kind):
            relevant["imatrix"] = {"calibration_sha256": calibration_sha256(options.calibration_text),
                                   "window": CALIBRATION_WINDOW} if options.imatrix else None
        return relevant

    def convert(self, model_path: Path, kinds: list[str], out_dir: Path, options: ConvertOptions) -> list[Variant]:
        float_kinds = [k for k in kinds if k[len(PREFIX):] in FLOAT_OUTPUT_TYPES]
        quant_kinds = [k for k in kinds if k not in float_kinds]
        if options.check_logits and "gguf-f32" not in kinds:
            raise EdgepackError("--check-logits compares F32 logits: add gguf-f32 to --to")
        for kind in quant_kinds:
            refuse_missing_imatrix(kind[len(PREFIX):], options.imatrix)
        for kind in kinds:
            refuse_existing(gguf_path(out_dir, kind), options.force)

        variants: list[Variant] = []
        for kind in float_kinds:
            path = gguf_path(out_dir, kind)
            convert_hf_to_gguf(model_path, path, outtype=kind[len(PREFIX):], force=options.force,
                               allow_pickle=options.allow_pickle, show_progress=options.show_progress)
            variants.append(self._checked_variant(kind, path, model_path, CONVERTER_NAME,
                                                  logits=options.check_logits and kind == "gguf-f32"))

        if quant_kinds:
            with tempfile.TemporaryDirectory(dir=out_dir, prefix=".gguf-base.") as scratch:
                base = self._quantization_base(model_path, kinds, out_dir, Path(scratch), options)
                imatrix = None
                if options.imatrix and any(_takes_imatrix(kind) for kind in quant_kinds):
                    imatrix = self._importance_matrix(model_path, out_dir, options)
                for kind in quant_kinds:
                    path = gguf_path(out_dir, kind)
                    weights = imatrix if _takes_imatrix(kind) else None
                    say(f"quantizing {base.name} -> {path.name} with llama.cpp"
                        + (" and the importance matrix" if weights is not None else ""))
                    quantize_gguf(base, path, kind[len(PREFIX):], force=options.force, threads=options.threads,
                                  imatrix=weights)
                    shares = inspect_gguf(path).quant_types
                    say(f"{path.name}: tensor bytes by type: "
                        + ", ".join(f"{name} {share:.0%}" for name, share in shares.items()))
                    variants.append(self._checked_variant(kind, path, model_path,
                                                          f"{CONVERTER_NAME} + {quantizer_name()}", logits=False))
        return variants

    def _quantization_base(self, model_path: Path, kinds: list[str], out_dir: Path, scratch: Path,
                           options: ConvertOptions) -> Path:
        """A float GGUF that loses nothing of the HF weights: reuse a requested one, else write a temporary one."""
        stored = HFModelDir(model_path, allow_pickle=options.allow_pickle).stored_dtype
        lossless = _LOSSLESS_BASE.get(stored, "f32")
        for outtype in (lossless, "f32"):
            if f"{PREFIX}{outtype}" in kinds:
                return gguf_path(out_dir, f"{PREFIX}{outtype}")
        base = scratch / f"base-{lossless}.gguf"
        convert_hf_to_gguf(model_path, base, outtype=lossless, allow_pickle=options.allow_pickle,
                           show_progress=options.show_progress)
        return base

    @staticmethod
    def _importance_matrix(model_path: Path, out_dir: Path, options: ConvertOptions) -> ImportanceMatrix:
        """Computed in torch over the calibration text, written to IMATRIX_FILE and read back from it, so the
        quantizer gets exactly what the file holds."""
        source = HFModelDir(model_path, allow_pickle=options.allow_pickle)
        what = BUILTIN_CALIBRATION_NAME if options.calibration_text is None else "the --calibration-text file"
        dataset = f"{what} (sha256 {calibration_sha256(options.calibration_text)[:12]})"
        say(f"computing an importance matrix in torch over {dataset}")
        matrix = compute_imatrix(source, calibration_text(options.calibration_text), dataset)
        path = out_dir / IMATRIX_FILE
        write_imatrix(matrix, path, architecture_for_config(source.config).name)
        say(f"{path.name}: {matrix.describe()}")
        return read_imatrix(path)

    def _checked_variant(self, kind: str, path: Path, model_path: Path, converter: str, logits: bool) -> Variant:
        """Run the parity checks on `path` while its sha256 is computed on another thread (hashing releases
        the GIL), then describe it as a Variant."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            digest = pool.submit(sha256_file, path)
            try:
                self._check(path, model_path, logits)
            finally:
                sha256 = digest.result()
        return Variant(kind=kind, path=path, files=(path.name,), bytes=path.stat().st_size, sha256=sha256,
                       converter=converter, library_versions=library_versions())

    @staticmethod
    def _check(path: Path, model_path: Path, logits: bool) -> None:
        try:
            parity = check_tokenizer_parity(path, model_path)
            say(f"{path.name}: tokenizer parity ok ({parity.tokens_checked} tokens over {parity.texts_checked} texts)")
            if logits:
                result = check_logit_parity(path, model_path)
                say(f"{path.name}: logit parity ok (max |diff| {result.max_abs_diff:.2e} over {result.positions} "
                    f"positions, argmax agreement {result.argmax_agreement:.0%})")
        except Exception:
            path.unlink(missing_ok=True)  # a file that failed its check must not look like a finished variant
            raise


def _takes_imatrix(kind: str) -> bool:
    suffix = kind[len(PREFIX):]
    return suffix not in FLOAT_OUTPUT_TYPES and uses_imatrix(suffix)


GGUF_CONVERTER = GGUFConverter()
