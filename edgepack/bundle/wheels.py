"""`--offline-wheels`: every wheel the bundle's server needs on the target's platform and Python, and an install.sh
that installs them with no network.

pip downloads for the target's platform tag; a package with no wheel there (llama-cpp-python has none on PyPI)
is carried as its source distribution together with what building it needs, and the report gives the command.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgepack.core.errors import EdgepackError
from edgepack.core.progress import say
from edgepack.measure.device_values import value_problem
from edgepack.measure.targets import TargetProfile

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVE_PACKAGES = ("click", "rich", "psutil", "numpy", "fastapi", "uvicorn", "httpx", "prometheus-client", "regex",
                  "tomli")
ENGINE_PACKAGES = {"llamacpp": ("llama-cpp-python", "gguf"),  # gguf: the engine reads GGUF metadata
                   "onnxrt": ("onnxruntime", "transformers", "tokenizers")}
# modules an engine imports only for a feature that, without them, is refused with what to install: the ONNX engine's
# output grammars use llama.cpp's grammar sampler, and its wheelhouse leaves llama-cpp-python out (it would compile on
# the device), so an ONNX bundle installed offline serves without response_format until it is installed
OPTIONAL_ENGINE_MODULES = {"onnxrt": ("llama_cpp",)}
# scikit-build-core looks for these on the device and asks for them as build requirements when absent
NATIVE_BUILD_TOOLS = ("cmake>=3.21", "ninja")
MAX_MANYLINUX_MINOR = 35  # glibc of Ubuntu 22.04 (JetPack 6)
# build and bundle outputs at the top of a checkout (hidden folders, .venv and .git among them, are left out too)
NOT_SOURCE_AT_TOP = ("build", "dist", "out")


@dataclass(frozen=True)
class SourcePackage:
    file: str
    build_command: str


@dataclass(frozen=True)
class WheelSet:
    platform: str
    python_version: str
    files: tuple[str, ...]
    sources: tuple[SourcePackage, ...]
    requirements: tuple[str, ...]


def serve_requirements(engine: str, python_version: str) -> list[str]:
    """edgepack's own requirement strings (with their version ranges) for what serving with `engine` imports, their
    environment markers evaluated for the target's Python (pip would evaluate them for the one running here)."""
    from packaging.requirements import Requirement

    wanted = {*SERVE_PACKAGES, *ENGINE_PACKAGES.get(engine, ())}
    # read from the source the carried edgepack wheel is built from: an editable install's metadata can be older
    declared = _load_toml(_pyproject().read_text(encoding="utf-8"))["project"]["dependencies"]
    undeclared = wanted - {Requirement(text).name.lower() for text in declared}
    if undeclared:
        raise EdgepackError(f"serving needs {', '.join(sorted(undeclared))}, which pyproject.toml's [project] "
                            "dependencies do not declare: add them there")
    out = []
    for text in declared:
        requirement = Requirement(text)
        if requirement.name.lower() not in wanted:
            continue
        if requirement.marker is not None:
            environment = {"python_version": python_version, "python_full_version": f"{python_version}.0",
                           "extra": ""}
            if not requirement.marker.evaluate(environment):
                continue
            requirement.marker = None
        out.append(str(requirement))
    return out


def platform_tags(platform: str) -> list[str]:
    """The tags a wheel for `platform` may carry: manylinux2014_X accepts manylinux_2_17..2_35_X, macOS 11 arm64
    accepts wheels built for 11..15."""
    match = re.fullmatch(r"manylinux2014_(\w+)", platform)
    if match:
        arch = match.group(1)
        return [platform] + [f"manylinux_2_{minor}_{arch}" for minor in range(17, MAX_MANYLINUX_MINOR + 1)]
    match = re.fullmatch(r"macosx_(\d+)_0_(\w+)", platform)
    if match:
        first, arch = int(match.group(1)), match.group(2)
        return [f"macosx_{major}_0_{arch}" for major in range(first, 16)]
    return [platform]


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True)


def _load_toml(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def _pyproject() -> Path:
    path = PROJECT_ROOT / "pyproject.toml"
    if not path.is_file():
        raise EdgepackError("--offline-wheels builds edgepack's own wheel from its source tree, which this install "
                            "does not have (install edgepack with pip install -e from a checkout)")
    return path


def _sdist_requirements(sdist: Path) -> list[str]:
    """What building and running a source distribution needs: its build-system requires and its run deps."""
    needs: list[str] = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) != 2:
                continue
            handle = tar.extractfile(member) if parts[1] in ("pyproject.toml", "PKG-INFO") else None
            if handle is None:
                continue
            text = handle.read().decode("utf-8", "replace")
            if parts[1] == "pyproject.toml":
                needs += _load_toml(text).get("build-system", {}).get("requires", [])
            else:
                needs += [line.split(":", 1)[1].strip() for line in text.splitlines()
                          if line.startswith("Requires-Dist:") and "extra ==" not in line]
    return needs


def _not_source(directory: str, names: list[str]) -> set[str]:
    at_top = Path(directory) == PROJECT_ROOT
    return {name for name in names if name == "__pycache__" or name.endswith(".egg-info")
            or (at_top and (name.startswith(".") or name in NOT_SOURCE_AT_TOP))}


def _build_own_wheel(dest: Path) -> None:
    """edgepack's wheel, built from a copy of its source alone: setuptools builds in the tree's build/ folder, and
    whatever an earlier build left there (modules since deleted or moved) would ship in the wheel too."""
    with tempfile.TemporaryDirectory(prefix="edgepack-source-") as scratch:
        source = Path(scratch) / "edgepack"
        shutil.copytree(PROJECT_ROOT, source, ignore=_not_source)
        done = _pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest), str(source))
    if done.returncode != 0:
        raise EdgepackError(f"building edgepack's wheel failed: {done.stderr.strip()[-500:]}")


def download_wheels(dest: Path, engine: str, target: TargetProfile) -> WheelSet:
    _pyproject()  # a clear refusal, before anything is written, when there is no source tree
    dest.mkdir(parents=True, exist_ok=True)
    say(f"building the edgepack wheel for {dest}")
    _build_own_wheel(dest)
    requirements = serve_requirements(engine, target.python_version)
    binary, sources = list(requirements), []
    target_args = [arg for tag in platform_tags(target.python_platform) for arg in ("--platform", tag)]
    target_args += ["--python-version", target.python_version, "--implementation", "cp"]
    while True:
        say(f"downloading wheels for {target.python_platform}, Python {target.python_version}: "
            f"{', '.join(binary)}")
        done = _pip("download", "--only-binary=:all:", "--dest", str(dest), *target_args, *binary)
        if done.returncode == 0:
            break
        missing = re.search(r"No matching distribution found for ([A-Za-z0-9_.\-]+)", done.stderr)
        name = missing.group(1).lower() if missing else None
        top = next((r for r in binary if name and r.lower().startswith(name)), None)
        if top is None or name in {s.file.split("-")[0].replace("_", "-") for s in sources}:
            raise EdgepackError(f"pip could not download the server's packages for {target.python_platform} "
                                f"(Python {target.python_version}): {done.stderr.strip()[-600:]}")
        say(f"{name} has no wheel for {target.python_platform}: carrying its source distribution")
        got = _pip("download", "--no-deps", "--no-binary=:all:", "--dest", str(dest), top)
        if got.returncode != 0:
            raise EdgepackError(f"pip could not download the source of {top}: {got.stderr.strip()[-400:]}")
        sdist = next(p for p in dest.iterdir() if p.name.lower().replace("_", "-").startswith(name)
                     and p.name.endswith((".tar.gz", ".zip")))
        cmake_args = 'CMAKE_ARGS="-DGGML_CUDA=on" ' if target.accelerator in ("jetson-gpu", "cuda") and \
            name == "llama-cpp-python" else ""
        sources.append(SourcePackage(file=sdist.name, build_command=(
            f"{cmake_args}.venv/bin/pip install --no-index --find-links wheels wheels/{sdist.name}")))
        binary.remove(top)
        binary += [r for r in _sdist_requirements(sdist) if r not in binary] + list(NATIVE_BUILD_TOOLS)
    (dest / "requirements.txt").write_text("\n".join(requirements) + "\n")
    files = tuple(sorted(p.name for p in dest.iterdir() if p.is_file()))
    return WheelSet(platform=target.python_platform, python_version=target.python_version, files=files,
                    sources=tuple(sources), requirements=tuple(requirements))


INSTALL_SH = """#!/bin/sh
# Install this bundle's server with no network: a virtual environment in .venv/, from wheels/ only.
# PYTHON picks the interpreter (default python3; the bundle was made for Python {python_version}).
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${{PYTHON:-python3}}"
"$PYTHON" -m venv "$HERE/.venv"
PIP="$HERE/.venv/bin/pip"
cd "$HERE"
{env}"$PIP" install --no-index --find-links "$HERE/wheels" -r "$HERE/wheels/requirements.txt"
"$PIP" install --no-index --no-deps "$HERE"/wheels/edgepack-*.whl
echo "installed into $HERE/.venv; start the server with $HERE/run.sh"
"""


def install_script(wheels: WheelSet) -> str:
    problem = value_problem("python version", wheels.python_version)
    if problem:  # it goes into install.sh
        raise EdgepackError(f"the target's python_version {wheels.python_version!r} {problem}; refusing to write it "
                            "into install.sh")
    env = ""
    for source in wheels.sources:
        if source.build_command.startswith("CMAKE_ARGS="):
            env = source.build_command.split(" ", 1)[0] + " "
    return INSTALL_SH.format(python_version=wheels.python_version, env=env)
