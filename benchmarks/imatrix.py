"""Our importance matrix against llama.cpp's own `llama-imatrix`, on the same model and calibration text.

    python -m benchmarks.imatrix [--model DIR] [--json]

1. `edgepack convert` makes gguf-f32 and gguf-q4_k_m with our imatrix (computed in torch), and gguf-q4_k_m with
   `--no-imatrix`;
2. llama-imatrix (built by benchmarks.llama_tools) reads the same built-in calibration text in 512-token chunks on
   gguf-f32; llama-quantize makes Q4_K_M from gguf-f32 with its matrix, and with ours (the file is accepted or not);
3. the per-column importances of the two matrices are correlated tensor by tensor, and the three Q4_K_M files are
   scored by `edgepack eval` (prose only) against the original model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import resolve_demo_model


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model directory (default: the demo student)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from benchmarks.llama_tools import tools_dir
    from converters.calibration import BUILTIN_CALIBRATION_TEXT
    from converters.gguf.imatrix_file import read_imatrix
    from edgepack.core.cache import cache_root
    from runtimes.llamacpp_amx import use_extra_buffers_here

    console = Console(stderr=True, soft_wrap=True)
    model = args.model or resolve_demo_model()
    root = cache_root() / "bench" / model.name / "imatrix-check"
    ours, none = root / "ours", root / "none"
    edgepack = [sys.executable, "-m", "edgepack"]
    if not (ours / "gguf-q4_k_m.gguf").exists():
        console.print("converting with our imatrix ...")
        _run([*edgepack, "convert", str(model), "--to", "gguf-f32,gguf-q4_k_m", "--out", str(ours)])
    if not (none / "gguf-q4_k_m.gguf").exists():
        console.print("converting without an imatrix ...")
        _run([*edgepack, "convert", str(model), "--to", "gguf-q4_k_m", "--no-imatrix", "--out", str(none)])
    tools = tools_dir()
    no_repack = [] if use_extra_buffers_here() else ["--no-repack"]
    theirs_matrix = root / "llama-imatrix.gguf"
    if not theirs_matrix.exists():
        console.print("llama-imatrix on the same calibration text ...")
        _run([str(tools / "llama-imatrix"), "-m", str(ours / "gguf-f32.gguf"), "-f", str(BUILTIN_CALIBRATION_TEXT),
              "-c", "512", "-t", "2", "-o", str(theirs_matrix), *no_repack])
    by_llama = {"theirs": root / "q4_k_m-llama-imatrix.gguf", "ours": root / "q4_k_m-ours-by-llama-quantize.gguf"}
    for label, matrix in (("theirs", theirs_matrix), ("ours", ours / "imatrix.gguf")):
        if not by_llama[label].exists():
            console.print(f"llama-quantize --imatrix ({label}) ...")
            _run([str(tools / "llama-quantize"), "--imatrix", str(matrix), str(ours / "gguf-f32.gguf"),
                  str(by_llama[label]), "Q4_K_M"])

    mine, theirs = read_imatrix(ours / "imatrix.gguf").importances(), read_imatrix(theirs_matrix).importances()
    shared = sorted(set(mine) & set(theirs))
    correlations = {name: float(np.corrcoef(mine[name], theirs[name])[0, 1]) for name in shared}

    variants = {"q4_k_m, no imatrix": none / "gguf-q4_k_m.gguf", "q4_k_m, our imatrix": ours / "gguf-q4_k_m.gguf",
                "q4_k_m, llama-imatrix's": by_llama["theirs"],
                "q4_k_m, our imatrix via llama-quantize": by_llama["ours"]}
    console.print("scoring the Q4_K_M files ...")
    done = subprocess.run([*edgepack, "eval", str(model), *map(str, variants.values()), "--no-behaviour", "--json"],
                          capture_output=True, text=True)
    if done.returncode not in (0, 5):
        raise RuntimeError(done.stderr[-3000:])
    scored = {Path(v["path"]): v for v in json.loads(done.stdout)["variants"]}

    table = Table(title=f"importance matrices of {model.name}: ours vs llama-imatrix ({len(shared)} tensors; "
                        f"{len(set(mine) ^ set(theirs))} in only one)")
    table.add_column("correlation of per-column importances")
    table.add_column("value")
    values = np.array(list(correlations.values()))
    for label, value in (("minimum", values.min()), ("median", np.median(values)), ("mean", values.mean())):
        table.add_row(label, f"{value:.4f}")
    console.print(table)
    kld = Table(title="Q4_K_M against the original model (built-in evaluation text, second half of 512-token windows)")
    for column in ("variant", "MiB", "KLD mean [95%]", "PPL ratio [95%]", "KLD vs no imatrix"):
        kld.add_column(column)
    base = scored[variants["q4_k_m, no imatrix"]]["kld_mean"]
    for label, path in variants.items():
        v = scored[path]
        kld.add_row(label, f"{path.stat().st_size / 2**20:.1f}",
                    f"{v['kld_mean']:.4f} [{v['kld_mean_ci'][0]:.4f}, {v['kld_mean_ci'][1]:.4f}]",
                    f"{v['ppl_ratio']:.4f} [{v['ppl_ratio_ci'][0]:.4f}, {v['ppl_ratio_ci'][1]:.4f}]",
                    f"x{v['kld_mean'] / base:.3f}")
    console.print(kld)
    worst = sorted(correlations.items(), key=lambda item: item[1])[:3]
    console.print("least correlated: " + ", ".join(f"{name} {value:.4f}" for name, value in worst))
    if args.json:
        print(json.dumps({"correlations": correlations,
                          "kld": {label: scored[path]["kld_mean"] for label, path in variants.items()}}, indent=2))


if __name__ == "__main__":
    main()
