"""`edgepack build` timed: a cold build (empty stage cache) and a cached re-run, stage by stage.

    python -m benchmarks.build [--model DIR] [--target host] [--formats gguf,onnx] [--also TARGET ...] [--json]

The cold build runs with a fresh EDGEPACK_CACHE (the demo student's one-time import is linked in from the usual
cache, so it is not counted); the re-run uses that cache and the same output folder. `--also` builds further
targets afterwards on the same cache (their conversions and measurements are reused; predictions are new).
Each build runs in its own process; wall time and peak RSS come from wait4.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import run_measured


def timed_build(model: Path | None, target: str, formats: str, out: Path, env: dict[str, str]) -> dict:
    command = [sys.executable, "-m", "edgepack", "build", *([str(model)] if model else []), "--target", target,
               "--formats", formats, "--out", str(out), "--json"]
    with tempfile.TemporaryFile() as stdout:
        result = run_measured(command, env=env, stdout=stdout)
        stdout.seek(0)
        report = json.loads(stdout.read())
    return {"target": target, "wall_s": result.wall_s, "peak_rss_mib": result.peak_rss_mib,
            "chosen": report["chosen"], "stages": report["stages"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the demo student")
    parser.add_argument("--target", default="host")
    parser.add_argument("--formats", default="gguf,onnx")
    parser.add_argument("--also", nargs="*", default=["jetson-orin-nano-8gb", "raspberry-pi-5-8gb"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from edgepack.core.cache import cache_root

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-build-") as scratch:
        cache = Path(scratch) / "cache"
        cache.mkdir()
        demo = cache_root() / "demo"
        if args.model is None and demo.is_dir():
            os.symlink(demo, cache / "demo")
        env = {**os.environ, "EDGEPACK_CACHE": str(cache)}
        out = Path(scratch) / "dist"
        rows.append({"run": "cold", **timed_build(args.model, args.target, args.formats, out, env)})
        rows.append({"run": "cached", **timed_build(args.model, args.target, args.formats, out, env)})
        for target in args.also:
            rows.append({"run": "other target", **timed_build(args.model, target, args.formats, out, env)})
        shutil.rmtree(out, ignore_errors=True)

    if args.json:
        print(json.dumps(rows, indent=2))
        return
    stage_names = [s["name"] for s in rows[0]["stages"]]
    print("| run | target | " + " | ".join(f"{name} s (run/cached)" for name in stage_names)
          + " | wall s | peak RSS MiB | chosen |")
    print("|---" * (len(stage_names) + 5) + "|")
    for row in rows:
        stages = {s["name"]: s for s in row["stages"]}
        cells = [f"{stages[n]['seconds']:.1f} ({stages[n]['ran']}/{stages[n]['cached']})" for n in stage_names]
        print(f"| {row['run']} | {row['target']} | " + " | ".join(cells)
              + f" | {row['wall_s']:.1f} | {row['peak_rss_mib']:.0f} | {row['chosen']} |")


if __name__ == "__main__":
    main()
