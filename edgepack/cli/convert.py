"""`edgepack convert` and `edgepack import-gguf`: Hugging Face <-> deployable variants."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.rendering import note, print_json, stdout_console, variants_table
from edgepack.core.cpu import INT8_ISAS
from edgepack.core.errors import EdgepackError


def imatrix_options(command):
    """The importance matrix's options, shared by `convert` and `build`."""
    for option in reversed((
            click.option("--no-imatrix", is_flag=True,
                         help="Quantize GGUF without an importance matrix (the IQ kinds need one)."),
            click.option("--calibration-text", "calibration_file", type=click.Path(path_type=Path), default=None,
                         help="Text to compute the importance matrix on (default: edgepack's built-in text of "
                              "~3,500 words, not the evaluation text)."))):
        command = option(command)
    return command


def imatrix_choice(no_imatrix: bool, calibration_file: Path | None) -> tuple[bool, str | None]:
    """(use an importance matrix, the calibration text or None for the built-in one) from the options."""
    from converters.calibration import read_calibration_text

    if no_imatrix and calibration_file is not None:
        raise EdgepackError("--calibration-text is the importance matrix's text, and --no-imatrix turns the matrix "
                            "off; give one or the other")
    return not no_imatrix, read_calibration_text(calibration_file)


@click.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--to", "kinds", default="gguf-f16,gguf-q8_0,gguf-q4_k_m", show_default=True,
              help="Comma-separated variant kinds: gguf-f32, gguf-f16, gguf-bf16, gguf-<llama.cpp type> "
                   "(gguf-q8_0, gguf-q5_k_m, gguf-q4_k_m, gguf-q3_k_m, gguf-iq4_xs, gguf-iq3_m, ...), "
                   "onnx-fp32, onnx-int8, onnx-int4 (and those of any converter plugin).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--force", is_flag=True, help="Overwrite outputs that exist.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (loaded with weights_only=True).")
@click.option("--check-logits", is_flag=True,
              help="Compare llama.cpp's F32 logits with transformers' (needs gguf-f32).")
@click.option("--threads", type=int, default=None, help="Threads for quantization (default: all cores).")
@click.option("--int8-isa", type=click.Choice(INT8_ISAS), default=None,
              help="onnx-int8: the target's integer kernels (default: detected on this machine).")
@click.option("--int4-block-size", type=int, default=32, show_default=True, help="onnx-int4: weights per block.")
@imatrix_options
@click.option("--json", "as_json", is_flag=True, help="Print the variants as JSON on stdout.")
def convert(model: Path | None, kinds: str, out_dir: Path, force: bool, allow_pickle: bool, check_logits: bool,
            threads: int | None, int8_isa: str | None, int4_block_size: int, no_imatrix: bool,
            calibration_file: Path | None, as_json: bool) -> None:
    """Convert a Hugging Face MODEL directory (default: the demo student) to deployable variants."""
    from edgepack.convert import ConvertOptions, parse_kinds
    from edgepack.convert import convert as run_convert
    from edgepack.student import resolve_model

    imatrix, calibration_text = imatrix_choice(no_imatrix, calibration_file)
    options = ConvertOptions(force=force, allow_pickle=allow_pickle, check_logits=check_logits, threads=threads,
                             int8_isa=int8_isa, int4_block_size=int4_block_size,  # type: ignore[arg-type]
                             imatrix=imatrix, calibration_text=calibration_text)
    variants = run_convert(resolve_model(model), parse_kinds(kinds), out_dir, options)
    if as_json:
        print_json({"variants": [{"kind": v.kind, "path": str(v.path), "bytes": v.bytes, "sha256": v.sha256}
                                 for v in variants]})
        return
    stdout_console().print(variants_table(variants))


@click.command("import-gguf")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output HF directory.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16"]), default="f32", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite the output directory if it exists.")
def import_gguf(gguf_file: Path, out_dir: Path, dtype: str, force: bool) -> None:
    """Rebuild a Hugging Face model directory from a GGUF file (weights dequantized)."""
    from converters.gguf.to_hf import import_gguf_checked

    parity = import_gguf_checked(gguf_file, out_dir, dtype=dtype, force=force)
    note(f"tokenizer parity with llama.cpp ok ({parity.tokens_checked} tokens)")
    click.echo(str(out_dir))
