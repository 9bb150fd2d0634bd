"""A new format and a new engine are one module and one registry line each: a plugin distribution (its module
and its entry points, as pip would install them) makes `edgepack convert` and `edgepack run` use them, and
`edgepack build`'s formats, the target profiles' engines and `run --engine`'s choices come from the registries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_edgepack

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).parent / "data" / "plugin" / "edgepack_caesar.py"

ENTRY_POINTS = """[edgepack.converters]
caesar = edgepack_caesar:CAESAR_CONVERTER

[edgepack.runtimes]
caesar = edgepack_caesar:CaesarRuntime
"""


@pytest.fixture
def plugin_env(tmp_path) -> dict[str, str]:
    """An environment in which the caesar plugin is installed: its module and its dist-info on the path."""
    site = tmp_path / "site"
    dist_info = site / "edgepack_caesar-0.1.dist-info"
    dist_info.mkdir(parents=True)
    shutil.copy(PLUGIN, site / PLUGIN.name)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: edgepack-caesar\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(ENTRY_POINTS)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def test_a_plugin_format_converts_and_a_plugin_engine_runs_it(plugin_env, tiny_model, tmp_path):
    out = tmp_path / "variants"
    done = run_edgepack(["convert", str(tiny_model("llama-bpe")), "--to", "caesar-3", "--out", str(out), "--json"],
                    plugin_env)
    assert done.returncode == 0, done.stderr
    (variant,) = json.loads(done.stdout)["variants"]
    assert variant["kind"] == "caesar-3" and Path(variant["path"]) == out / "caesar-3.caesar"

    # the engine is found from the path; each byte is followed by itself + 3: after "c" come "f", "i", "l"
    done = run_edgepack(["run", variant["path"], "abc", "--max-tokens", "3", "--json"], plugin_env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["engine"], report["text"], report["completion_tokens"]) == ("caesar", "fil", 3)

    # and it is one of --engine's choices
    done = run_edgepack(["run", variant["path"], "x", "--engine", "caesar", "--max-tokens", "2", "--json"], plugin_env)
    assert done.returncode == 0 and json.loads(done.stdout)["text"] == "{~"  # x (120) -> { (123) -> ~ (126)


def test_the_registries_name_the_plugin_where_formats_and_engines_are_listed(plugin_env):
    script = ("import json; from converters.registry import formats; from edgepack.measure.targets import "
              "host_profile; from edgepack.pipeline.build import variant_kinds; p = host_profile(); "
              "print(json.dumps({'formats': formats(), 'host_formats': p.formats, 'host_engines': p.engines, "
              "'kinds': variant_kinds(('caesar',), p)}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=plugin_env, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert {"gguf", "onnx", "caesar"} <= set(listed["formats"]) and "caesar" in listed["host_formats"]
    assert "caesar" in listed["host_engines"] and listed["kinds"] == ["caesar-1"]


def test_without_the_plugin_its_kind_is_refused_with_what_is_accepted(tiny_model, tmp_path):
    done = run_edgepack(["convert", str(tiny_model("llama-bpe")), "--to", "caesar-3", "--out", str(tmp_path)],
                    {**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert "unknown variant kind 'caesar-3'" in done.stderr and "gguf-q4_k_m" in done.stderr


@pytest.mark.slow  # a whole build with a crashing engine: about a minute
def test_an_engine_that_crashes_rejects_its_variant_and_the_build_goes_on(plugin_env, tiny_model, tmp_path):
    """caesar-13's engine aborts the process as it loads: that variant is rejected with the signal's name, and the
    build ships the other one."""
    env = {**plugin_env, "EDGEPACK_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "dist"
    done = run_edgepack(["build", str(tiny_model("llama-bpe")), "--target", "host", "--formats",
                         "gguf-f16,caesar-13", "--out", str(out), "--json"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["chosen"] == "gguf-f16"
    (crash,) = [r for r in result["decision"]["rejected"] if r["name"] == "caesar-13"]
    assert crash["reason"] == "crashed" and "SIGABRT" in crash["detail"] and "quality stage" in crash["detail"]
    assert run_edgepack(["verify", result["bundle"]], env).returncode == 0
    report = (Path(result["bundle"]) / "report.md").read_text()
    assert "caesar-13" in report and "SIGABRT" in report
    # the tiny model has a chat template, so the build asked the behaviour prompts and reports the answers
    assert "## Answers to the behaviour prompts" in report and "| gguf-f16 | " in report.split("## Answers")[1]

    # measuring it alone: the crash is reported, and with nothing measured the exit code is 8
    variant = next((tmp_path / "cache" / "build" / "convert").rglob("caesar-13.caesar"))
    done = run_edgepack(["profile", str(variant), "--runs", "1", "--new-tokens", "4", "--prompt-tokens", "8"], env)
    assert done.returncode == 8 and "SIGABRT" in done.stderr + done.stdout
