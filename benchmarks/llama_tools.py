"""llama.cpp's own command-line tools (llama-perplexity, llama-imatrix, llama-quantize), built from the llama.cpp
sources inside the llama-cpp-python source distribution of the installed version, so the cross-checks compare with
exactly the llama.cpp that edgepack runs.

    python -m benchmarks.llama_tools            # prints the folder holding the tools (builds them once)

The build (CMake, about 10 minutes on 2 cores) is cached under the edgepack cache, per llama-cpp-python version.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from edgepack.core.cache import cache_root

TOOLS = ("llama-perplexity", "llama-imatrix", "llama-quantize")


def tools_dir() -> Path:
    """The folder with the built tools, building them first when they are not there."""
    release = version("llama_cpp_python")
    home = cache_root() / "tools" / f"llama.cpp-from-llama-cpp-python-{release}"
    if all((home / tool).is_file() for tool in TOOLS):
        return home
    with tempfile.TemporaryDirectory(prefix="llama-tools-") as scratch:
        work = Path(scratch)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--dest", str(work),
                        f"llama-cpp-python=={release}", "--disable-pip-version-check"], check=True)
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = work / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DBUILD_SHARED_LIBS=OFF"], check=True)
        subprocess.run(["cmake", "--build", str(build), "-j", "2", "--target", *TOOLS], check=True)
        home.mkdir(parents=True, exist_ok=True)
        for tool in TOOLS:
            (build / "bin" / tool).replace(home / tool)
    return home


if __name__ == "__main__":
    print(tools_dir())
