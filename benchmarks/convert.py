"""Our HF -> GGUF converter against llama.cpp's own convert_hf_to_gguf.py, on the demo student by default.

    python -m benchmarks.convert [--model DIR] [--repeats 3] [--llama-cpp-src DIR] [--json]

llama.cpp's script comes from the llama-cpp-python source distribution matching the installed version
(downloaded from the package index into a temporary directory, never kept). Both tools write F16; each run is a
fresh process, timed wall-clock with its own peak RSS; the two F16 files are then compared tensor by tensor
(names, shapes, types, max |difference|) and key by key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import RunResult, median, resolve_demo_model, run_measured

OURS_CLI = "edgepack convert (with tokenizer parity check)"
OURS_CORE = "edgepack converter alone"
THEIRS = "llama.cpp convert_hf_to_gguf.py"


def fetch_llama_cpp_converter(into: Path) -> Path:
    """Download llama-cpp-python's sdist and unpack llama.cpp's converter (script, its package, its gguf-py)."""
    from importlib.metadata import version

    wanted = version("llama-cpp-python")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={wanted}", "-d", str(into)], check=True)
    (sdist,) = into.glob("llama_cpp_python-*.tar.gz")
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers()
                   if "/vendor/llama.cpp/" in m.name and m.name.split("/vendor/llama.cpp/", 1)[1].startswith(keep)]
        archive.extractall(into, members=members, filter="data")
    (script,) = into.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py")
    return script


def compare_ggufs(ours: Path, theirs: Path) -> dict[str, Any]:
    import gguf
    import numpy as np

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    rows = []
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        same_layout = x.tensor_type == y.tensor_type and list(x.shape) == list(y.shape)
        diff = float("nan")
        if same_layout:
            diff = float(np.max(np.abs(np.asarray(x.data, np.float32) - np.asarray(y.data, np.float32))))
        identical = same_layout and np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes()
        rows.append({"name": name, "shape": [int(s) for s in x.shape], "ours_type": x.tensor_type.name,
                     "theirs_type": y.tensor_type.name, "max_abs_diff": diff, "identical": identical})

    def values(reader: gguf.GGUFReader) -> dict[str, Any]:
        out = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            value = field.contents()
            if isinstance(value, list) and len(value) >= 16:  # vocabularies: compare by digest
                digest = hashlib.sha256(json.dumps(value, default=str).encode()).hexdigest()[:12]
                value = f"<array of {len(value)}, sha256 {digest}>"
            out[key] = value
        return out

    va, vb = values(a), values(b)
    differing = {k: {"ours": va[k], "theirs": vb[k]} for k in sorted(set(va) & set(vb)) if va[k] != vb[k]}
    return {
        "tensors_only_ours": sorted(set(ta) - set(tb)),
        "tensors_only_theirs": sorted(set(tb) - set(ta)),
        "tensors_compared": len(rows),
        "tensors_identical": sum(r["identical"] for r in rows),
        "max_abs_diff": max((r["max_abs_diff"] for r in rows), default=0.0),
        "tensors_not_identical": [r for r in rows if not r["identical"]],
        "keys_only_ours": sorted(set(va) - set(vb)),
        "keys_only_theirs": sorted(set(vb) - set(va)),
        "keys_differing": differing,
        "keys_same": len([k for k in set(va) & set(vb) if va[k] == vb[k]]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model directory (default: the demo student)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama-cpp-src", type=Path, help="a llama.cpp checkout to take the script from")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, soft_wrap=True)
    model = args.model or resolve_demo_model()
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as scratch_name:
        scratch = Path(scratch_name)
        if args.llama_cpp_src:
            script = args.llama_cpp_src / "convert_hf_to_gguf.py"
        else:
            console.print("fetching llama.cpp's converter from the llama-cpp-python source distribution ...")
            script = fetch_llama_cpp_converter(scratch / "src")
        ours_out, core_out, theirs_out = scratch / "ours", scratch / "core.gguf", scratch / "theirs.gguf"
        core_code = ("import sys; from pathlib import Path; from converters.gguf.from_hf import convert_hf_to_gguf; "
                     "convert_hf_to_gguf(Path(sys.argv[1]), Path(sys.argv[2]), outtype='f16', force=True, "
                     "show_progress=False)")
        commands = {
            OURS_CLI: [sys.executable, "-m", "edgepack", "convert", str(model), "--to", "gguf-f16", "--out",
                       str(ours_out), "--force"],
            OURS_CORE: [sys.executable, "-c", core_code, str(model), str(core_out)],
            THEIRS: [sys.executable, str(script), str(model), "--outtype", "f16", "--outfile", str(theirs_out)],
        }
        runs: dict[str, list[RunResult]] = {name: [] for name in commands}
        for repeat in range(args.repeats):
            for name, command in commands.items():
                console.print(f"run {repeat + 1}/{args.repeats}: {name}")
                runs[name].append(run_measured(command))
        comparison = compare_ggufs(ours_out / "gguf-f16.gguf", theirs_out)

    summary = {name: {"wall_s_median": median([r.wall_s for r in rs]),
                      "wall_s_runs": [round(r.wall_s, 3) for r in rs],
                      "peak_rss_mib_median": median([r.peak_rss_mib for r in rs])} for name, rs in runs.items()}
    base = summary[THEIRS]
    for name in summary:
        summary[name]["time_ratio"] = summary[name]["wall_s_median"] / base["wall_s_median"]
        summary[name]["memory_ratio"] = summary[name]["peak_rss_mib_median"] / base["peak_rss_mib_median"]

    table = Table(title=f"HF -> GGUF F16 on {model.name} (median of {args.repeats}, fresh process each)")
    for column in ("tool", "wall s", "time ratio", "peak RSS MiB", "memory ratio"):
        table.add_column(column)
    for name, row in summary.items():
        table.add_row(name, f"{row['wall_s_median']:.2f}", f"{row['time_ratio']:.2f}x",
                      f"{row['peak_rss_mib_median']:.0f}", f"{row['memory_ratio']:.2f}x")
    console.print(table)
    console.print(f"tensors: {comparison['tensors_identical']}/{comparison['tensors_compared']} byte-identical, "
                  f"max |diff| {comparison['max_abs_diff']:.3g}; only ours: {comparison['tensors_only_ours']}; "
                  f"only theirs: {comparison['tensors_only_theirs']}")
    for row in comparison["tensors_not_identical"][:20]:
        console.print(f"  differs: {row['name']} {row['shape']} {row['ours_type']} vs {row['theirs_type']} "
                      f"max |diff| {row['max_abs_diff']:.3g}")
    console.print(f"metadata: {comparison['keys_same']} keys equal; only ours: {comparison['keys_only_ours']}; "
                  f"only theirs: {comparison['keys_only_theirs']}")
    for key, pair in comparison["keys_differing"].items():
        console.print(f"  {key}: ours {str(pair['ours'])[:80]!r} vs theirs {str(pair['theirs'])[:80]!r}")
    if args.json:
        print(json.dumps({"model": str(model), "runs": summary, "comparison": comparison}, indent=2, default=str))


if __name__ == "__main__":
    main()
