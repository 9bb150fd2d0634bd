"""`edgepack build` end to end on stories260K: the bundle round trip (build -> verify -> the launcher serves),
the cache (a re-run reuses every stage and the bundle), tampering, a build killed mid-way, predictions for a
target we are not on, nothing fits / nothing passes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import cli_runner
import pytest

from edgepack.bundle.verify import verify_bundle
from edgepack.core.errors import BundleInvalidError, EdgepackError

BUILD_FORMATS = "gguf"  # the three GGUF kinds: a full pipeline in seconds on stories260K


@pytest.fixture(scope="module")
def build_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for `edgepack` subprocesses: a cache of this module's own."""
    return {**os.environ, "EDGEPACK_CACHE": str(tmp_path_factory.mktemp("edgepack-cache"))}


def run_edgepack(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return cli_runner.run_edgepack(args, env, check)


@pytest.fixture(scope="module")
def build_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """What every build of this module's cache is made with: the three GGUF kinds, scored on the first quarter of the
    built-in evaluation text (the whole text is 104 windows of stories260K's context, 8 s for the reference alone;
    the stage reads it all the same way). The builds share the quality stage's cache only with the same text."""
    from edgepack.quality.reference import DEFAULT_EVAL_TEXT

    text = DEFAULT_EVAL_TEXT.read_text()
    short = tmp_path_factory.mktemp("eval-text") / "eval.txt"
    short.write_text(text[:len(text) // 4])
    return ["--formats", BUILD_FORMATS, "--eval-text", str(short)]


@pytest.fixture(scope="module")
def host_build(stories_dir: Path, build_env: dict[str, str], build_args: list[str],
               tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("dist")
    done = run_edgepack(["build", str(stories_dir), "--target", "host", *build_args, "--out", str(out), "--json"],
                        build_env)
    return out, json.loads(done.stdout)


def test_build_writes_a_bundle_that_verifies(host_build):
    out, result = host_build
    bundle = Path(result["bundle"])
    assert bundle == out / "stories260K-hf-host"
    assert Path(result["archive"]) == out / "stories260K-hf-host.tar.gz"
    for path in (bundle, Path(result["archive"])):
        report = verify_bundle(path)
        assert report.chosen_variant == result["chosen"] and report.target == "host"
    manifest = json.loads((bundle / "edgepack.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["variant"]["kind"] == result["chosen"] and manifest["variant"]["engine"] == "llamacpp"
    names = {f["path"] for f in manifest["files"]}
    assert {f"model/{result['chosen']}.gguf", "report.md", "report.json", "run.sh", "run.bat", "deploy/Dockerfile",
            "deploy/Modelfile", "deploy/edgepack-stories260K-hf-host.service",
            "deploy/com.edgepack.stories260K-hf-host.plist"} <= names
    assert manifest["server"]["model_path"] == f"model/{result['chosen']}.gguf"
    assert manifest["server"]["context"] == 512  # stories260K's own context
    assert {q["name"] for q in manifest["quality"]["variants"]} == {"gguf-f16", "gguf-q8_0", "gguf-q4_k_m"}
    # every other variant has its reason, with numbers
    assert {r["name"] for r in manifest["decision"]["rejected"]} == {"gguf-f16", "gguf-q8_0", "gguf-q4_k_m"} - \
        {result["chosen"]}
    assert all(any(ch.isdigit() for ch in r["detail"]) for r in manifest["decision"]["rejected"])
    # no path of the build machine leaks into what is shipped
    text = (bundle / "edgepack.json").read_text() + (bundle / "report.json").read_text()
    assert str(Path.home()) not in text and "edgepack-cache" not in text
    report_md = (bundle / "report.md").read_text()
    assert f"**Chosen: `{result['chosen']}`**" in report_md and "measured on this machine" in report_md
    # a model imported from a quantized GGUF (the demo student) says what its figures are relative to
    assert "Reference weights" not in report_md
    from edgepack.bundle.report import render_markdown

    report = json.loads((bundle / "report.json").read_text())
    report["model"]["origin"] = "imported from x.Q4_1.gguf, whose weights are F32, Q4_1, dequantized to f32"
    assert "- Reference weights: imported from x.Q4_1.gguf" in render_markdown(report)


def test_cached_rebuild_reuses_every_stage_and_the_bundle(host_build, stories_dir, build_env, build_args):
    out, first = host_build
    manifest_before = (out / "stories260K-hf-host" / "edgepack.json").read_text()
    done = run_edgepack(["build", str(stories_dir), "--target", "host", *build_args, "--out",
                         str(out), "--json"], build_env)
    again = json.loads(done.stdout)
    assert again["chosen"] == first["chosen"]
    stages = {s["name"]: s for s in again["stages"]}
    assert all(stages[name]["ran"] == 0 for name in ("convert", "quality", "measure"))
    assert stages["convert"]["cached"] == 3
    manifest_after = (out / "stories260K-hf-host" / "edgepack.json").read_text()
    if stages["bundle"]["ran"]:  # only when this machine's free memory moved the host budget to another step
        assert json.loads(manifest_after)["target"]["memory_budget_gib"] != \
            json.loads(manifest_before)["target"]["memory_budget_gib"]
    else:
        assert manifest_after == manifest_before


def test_the_launcher_starts_the_server(host_build, build_env):
    out, result = host_build
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**build_env, "EDGEPACK_PORT": str(port), "PATH": f"{Path(sys.executable).parent}:{build_env['PATH']}"}
    server = subprocess.Popen([str(Path(result["bundle"]) / "run.sh")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        cli_runner.wait_until_healthy(f"http://127.0.0.1:{port}", server, timeout=60)
        body = json.dumps({"model": "stories260K-hf", "prompt": "Once upon a time", "max_tokens": 8,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["text"].strip()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_inspect_says_what_is_inside_and_why(host_build, build_env):
    out, result = host_build
    done = run_edgepack(["inspect", result["archive"]], build_env)
    assert "verified: every file matches the manifest" in done.stdout
    assert f"chosen: {result['chosen']}: passes the gate" in done.stdout
    assert f"model/{result['chosen']}.gguf" in done.stdout


@pytest.fixture()
def bundle_copy(host_build, tmp_path: Path) -> Path:
    out, result = host_build
    copy = tmp_path / "bundle"
    shutil.copytree(result["bundle"], copy)
    return copy


def test_a_flipped_byte_fails_verify(bundle_copy: Path, build_env):
    model = next((bundle_copy / "model").iterdir())
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleInvalidError, match=f"model/{model.name}: sha256 differs"):
        verify_bundle(bundle_copy)
    done = run_edgepack(["verify", str(bundle_copy)], build_env, check=False)
    assert done.returncode == 7 and "sha256 differs" in done.stderr


def test_a_missing_file_fails_verify(bundle_copy: Path):
    (bundle_copy / "run.sh").unlink()
    with pytest.raises(BundleInvalidError, match="run.sh is listed in the manifest but missing"):
        verify_bundle(bundle_copy)


def test_an_extra_file_under_model_fails_verify(bundle_copy: Path):
    (bundle_copy / "model" / "extra.bin").write_bytes(b"not shipped")
    with pytest.raises(BundleInvalidError, match="model/extra.bin is in the bundle but not in its manifest"):
        verify_bundle(bundle_copy)


def test_a_bundle_without_its_manifest_or_with_a_broken_one_fails(bundle_copy: Path):
    manifest_path = bundle_copy / "edgepack.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleInvalidError, match="schema_version 99 is not supported"):
        verify_bundle(bundle_copy)
    del manifest["files"]
    manifest["schema_version"] = 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleInvalidError, match="manifest.files is missing"):
        verify_bundle(bundle_copy)
    manifest_path.unlink()
    with pytest.raises(BundleInvalidError, match="no edgepack.json"):
        verify_bundle(bundle_copy)


def test_serve_refuses_a_bundle_that_fails_verify(bundle_copy: Path, build_env):
    (bundle_copy / "model" / "extra.bin").write_bytes(b"x")
    done = run_edgepack(["serve", str(bundle_copy), "--port", "0"], build_env, check=False)
    assert done.returncode == 7 and "not in its manifest" in done.stderr


def test_a_damaged_archive_fails_verify(host_build, tmp_path: Path):
    out, result = host_build
    damaged = tmp_path / "damaged.tar.gz"
    data = bytearray(Path(result["archive"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(BundleInvalidError):
        verify_bundle(damaged)


def test_a_build_for_another_target_predicts_and_explains(host_build, stories_dir, build_env, build_args,
                                                          tmp_path: Path):
    done = run_edgepack(["build", str(stories_dir), "--target", "raspberry-pi-5-8gb", *build_args,
                         "--out", str(tmp_path), "--json"], build_env)
    result = json.loads(done.stdout)
    bundle = Path(result["bundle"])
    assert bundle.name == "stories260K-hf-raspberry-pi-5-8gb"
    verify_bundle(bundle)
    stages = {s["name"]: s for s in result["stages"]}
    # the host build's conversions and measurements are reused; predicting adds the runs the model is fitted and
    # checked on (the largest and smallest at 1 thread, the largest at a quarter of the context, the middle at both)
    assert stages["convert"]["ran"] == 0 and stages["measure"]["ran"] <= 4
    report = (bundle / "report.md").read_text()
    assert "are **predicted** for raspberry-pi-5-8gb" in report
    assert "GB/s data sheet x 0.7 achievable" in report and "(fitted on gguf-f16 and gguf-q4_k_m at 1 and 2 " \
        "threads)" in report
    manifest = json.loads((bundle / "edgepack.json").read_text())
    assert all(p["is_prediction"] for p in manifest["performance"])
    # the held-out check of the smallest variant gives every prediction its error
    assert all(p["decode_error"] is not None and p["memory_error"] is not None for p in manifest["performance"])
    assert "python:3.11-slim" in (bundle / "deploy" / "Dockerfile").read_text()
    assert manifest["server"]["device"] == "cpu"  # a Raspberry Pi has no GPU for LLMs
    jetson = run_edgepack(["build", str(stories_dir), "--target", "jetson-orin-nano-8gb", *build_args,
                           "--out", str(tmp_path), "--json"], build_env)
    jetson_manifest = json.loads((Path(json.loads(jetson.stdout)["bundle"]) / "edgepack.json").read_text())
    assert jetson_manifest["server"]["device"] == "cuda"
    # its GPU serves the bundle, so no decode figure comes from this CPU, and the choice says so
    assert all(p["decode_tps"] is None and "not predictable from this machine's CPU" in p["basis"]
               for p in jetson_manifest["performance"])
    assert "no decode figure for this target" in jetson_manifest["decision"]["why"]


def test_nothing_fits_exits_6_and_writes_no_bundle(host_build, stories_dir, build_env, build_args, tmp_path: Path):
    profile = tmp_path / "tiny.toml"
    profile.write_text((Path(__file__).resolve().parents[2] / "profiles" / "raspberry-pi-5-8gb.toml").read_text()
                       .replace('name = "raspberry-pi-5-8gb"', 'name = "tiny-device"')
                       .replace("memory_budget_gib = 6.5", "memory_budget_gib = 0.001"))
    out = tmp_path / "dist"
    done = run_edgepack(["build", str(stories_dir), "--profile", str(profile), *build_args, "--out",
                         str(out)], build_env, check=False)
    assert done.returncode == 6, done.stderr
    assert "no variant fits" in done.stderr and "budget is 1 MiB" in done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_nothing_passing_the_gate_exits_5(host_build, stories_dir, build_env, tmp_path: Path):
    text = tmp_path / "eval.txt"  # a text of its own: the variant is scored anew (its conversion is cached)
    text.write_text("Once upon a time there was a little girl who lived in a small house by the sea. " * 40)
    done = run_edgepack(["build", str(stories_dir), "--formats", "gguf-q4_k_m", "--max-kld", "0.000001", "--out",
                         str(tmp_path / "dist"), "--eval-text", str(text)], build_env, check=False)
    assert done.returncode == 5, done.stderr
    assert "no variant passes the quality gate; the closest is gguf-q4_k_m" in done.stderr
    assert re.search(r"gguf-q4_k_m: mean KLD [0-9.]+ \[[0-9., ]+\], PPL x[0-9.]+ \[[0-9., ]+\]: FAIL: mean KL "
                     r"divergence up to [0-9.]+ \(upper end of its 95% interval\)", done.stderr), done.stderr


@pytest.mark.slow  # a whole run, killed and resumed: about a minute
def test_a_build_killed_midway_resumes_and_never_leaves_a_bundle_that_verifies(stories_dir, tmp_path: Path):
    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "dist"
    args = [sys.executable, "-m", "edgepack", "build", str(stories_dir), "--formats", "gguf-q8_0,gguf-f16", "--out",
            str(out)]
    # kill at the start of quality, after its first variant, at the start of measuring, of bundling
    for marker in ("[3/5]", "gguf-q8_0: mean KLD", "[4/5]", "[5/5]"):
        process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = ""
        for line in process.stderr:
            seen += line
            if marker in line:
                process.kill()
                break
        process.wait(timeout=60)
        assert marker in seen, seen
        bundle = out / "stories260K-hf-host"
        if bundle.exists():  # only a bundle from an earlier, finished run may exist; it must still verify
            verify_bundle(bundle)
        for partial in out.glob(".*partial") if out.exists() else ():
            with pytest.raises((BundleInvalidError, EdgepackError)):
                verify_bundle(partial)
    done = subprocess.run([*args, "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    stages = {s["name"]: s for s in result["stages"]}
    assert stages["convert"]["ran"] == 0 and stages["convert"]["cached"] == 2  # converted before the first kill
    verify_bundle(Path(result["bundle"]))
    verify_bundle(Path(result["archive"]))
    assert not list(out.glob(".*partial"))
    # a build of one of those variants alone is all cache hits (its quality entry stands on its own)
    alone = subprocess.run([*args[:6], "gguf-q8_0", "--out", str(tmp_path / "alone"), "--json"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr
    stages = {s["name"]: s for s in json.loads(alone.stdout)["stages"]}
    assert (stages["quality"]["ran"], stages["quality"]["cached"]) == (0, 1)


def test_a_model_folder_whose_name_cannot_name_files_is_refused_before_any_write(tiny_model, tmp_path, build_env):
    odd = tmp_path / "my model;rm"
    shutil.copytree(tiny_model("llama-bpe"), odd)
    out = tmp_path / "dist"
    done = run_edgepack(["build", str(odd), "--out", str(out), "--formats", "gguf-f16"], build_env, check=False)
    assert done.returncode == 2 and "the model folder's name 'my model;rm' cannot name generated files" in done.stderr
    assert not out.exists()
