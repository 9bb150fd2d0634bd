"""`--offline-wheels` end to end, for every engine: a bundle built with its wheelhouse, extracted elsewhere,
installed by its install.sh with no network (a network namespace of its own), started by its run.sh and asked for
a completion by the real openai client. The llama.cpp case compiles llama-cpp-python from the carried source
distribution (5-10 minutes on 2 cores), so it is marked `compiles`, which the default run deselects.

The fixtures they share with every folder are in tests/conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import openai
import pytest
from cli_runner import run_edgepack, wait_until_healthy

from edgepack.bundle.verify import verify_bundle

SOURCE_ROOT = Path(__file__).resolve().parents[2]
# what a device has: the system's tools, no virtual environment, no checkout
DEVICE_PATH = "/usr/local/bin:/usr/bin:/bin"


@pytest.fixture(scope="module")
def package_index() -> None:
    """--offline-wheels downloads from the package index pip is configured with; without it these tests skip."""
    probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "click"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"the package index is not reachable: {probe.stderr.strip()[-200:]}")


@pytest.fixture(scope="module")
def without_network() -> list[str]:
    """The prefix that runs a command in a network namespace of its own, which has no network at all: `unshare -n`
    as root, `unshare -r -n` (in a user namespace) elsewhere. Where neither is permitted, no prefix and a warning:
    install.sh's pip --no-index, in an environment with nothing but PATH and HOME, still reads wheels/ only."""
    reasons = []
    for prefix in (["unshare", "-n"], ["unshare", "-r", "-n"]):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            reasons.append("unshare (util-linux) is not installed")
            break
        if probe.returncode == 0:
            return prefix
        reasons.append(f"`{' '.join(prefix)}` is not permitted here ({probe.stderr.strip()})")
    warnings.warn(f"installing with pip --no-index in the host's network: {'; '.join(reasons)}", stacklevel=1)
    return []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind, engine_package, carried_sources", [
    pytest.param("onnx-fp32", "onnxruntime", [], id="onnxrt"),
    # a quantized GGUF: on an AMX CPU the device-compiled llama.cpp crashes it unless the server loads it through
    # runtimes/llamacpp_amx.py's switch
    pytest.param("gguf-q4_k_m", "llama_cpp", ["llama_cpp_python"], id="llamacpp", marks=pytest.mark.compiles),
])
def test_an_offline_bundle_installs_with_no_network_and_answers_a_completion(
        kind, engine_package, carried_sources, package_index, without_network, stories_dir, tmp_path: Path):
    build_env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")}
    done = run_edgepack(["build", str(stories_dir), "--target", "host", "--formats", kind, "--offline-wheels",
                         "--out", str(tmp_path / "dist"), "--json"], build_env, check=True)
    result = json.loads(done.stdout)
    assert result["chosen"] == kind
    wheels = json.loads((Path(result["bundle"]) / "edgepack.json").read_text())["wheels"]
    assert [source["file"].split("-")[0] for source in wheels["sources"]] == carried_sources
    assert any(name.startswith("edgepack-") and name.endswith(".whl") for name in wheels["files"])

    shutil.unpack_archive(result["archive"], tmp_path / "device")
    bundle = tmp_path / "device" / Path(result["bundle"]).name
    device_env = {"PATH": DEVICE_PATH, "HOME": str(tmp_path)}
    installed = subprocess.run([*without_network, "sh", str(bundle / "install.sh")], capture_output=True, text=True,
                               timeout=1500, cwd=tmp_path, env={**device_env, "PYTHON": sys.executable})
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    verify_bundle(bundle)  # the .venv install.sh made is not part of what was shipped

    # the installed server sees its own site-packages and the interpreter's standard library, nothing else
    venv = (bundle / ".venv").resolve()
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import json, sys, edgepack, runtimes; "
                            "print(json.dumps([sys.path, edgepack.__file__, runtimes.__file__]))"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, env=device_env)
    assert probe.returncode == 0, probe.stderr
    path, *packages = json.loads(probe.stdout)
    site = next((venv / "lib").glob("python*/site-packages"))
    assert [p for p in path if p.endswith(("site-packages", "dist-packages"))] == [str(site)]
    assert all(Path(package).is_relative_to(site) for package in packages), packages
    assert (site / engine_package).is_dir() and not (site / "torch").exists()
    shipped = [module.relative_to(site) for package in ("edgepack", "runtimes", "converters")
               for module in (site / package).rglob("*.py")]
    stale = [str(module) for module in shipped if not (SOURCE_ROOT / module).is_file()]
    assert shipped and not stale, f"the edgepack wheel carries modules its source does not have: {stale[:10]}"
    targets = subprocess.run([str(venv / "bin" / "edgepack"), "targets", "--json"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path, env=device_env)
    assert "jetson-orin-nano-8gb" in targets.stdout, targets.stderr  # the profiles travel in the wheel

    port = free_port()
    server = subprocess.Popen([str(bundle / "run.sh")], env={**device_env, "EDGEPACK_PORT": str(port)}, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server, timeout=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        answer = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert answer.choices[0].text.strip() and answer.choices[0].finish_reason in ("length", "stop")
    usage = answer.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.slow
@pytest.mark.wheelhouse
def test_wheels_for_jetson_carry_llama_cpp_as_source_with_its_build_command(package_index, tmp_path: Path):
    from edgepack.bundle.wheels import download_wheels, install_script
    from edgepack.measure.targets import resolve_target

    jetson = resolve_target("jetson-orin-nano-8gb")
    wheel_set = download_wheels(tmp_path / "wheels", "llamacpp", jetson)
    assert [s.file.split("-")[0] for s in wheel_set.sources] == ["llama_cpp_python"]
    assert wheel_set.sources[0].build_command.startswith('CMAKE_ARGS="-DGGML_CUDA=on" .venv/bin/pip install '
                                                         "--no-index --find-links wheels wheels/llama_cpp_python-")
    names = wheel_set.files
    assert any(n.startswith("numpy-") and "cp310" in n and "aarch64" in n for n in names)
    assert any(n.startswith("cmake-") and "aarch64" in n for n in names)  # llama.cpp's build needs it offline
    assert any(n.startswith("scikit_build_core-") for n in names)
    assert any(n.startswith("tomli-") for n in names)  # Python 3.10 on JetPack 6 needs it
    assert any(n.startswith("gguf-") for n in names)  # the llama.cpp engine reads GGUF metadata with gguf-py
    assert 'CMAKE_ARGS="-DGGML_CUDA=on" "$PIP" install --no-index' in install_script(wheel_set)
