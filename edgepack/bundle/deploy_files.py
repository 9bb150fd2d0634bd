"""The text files a bundle ships to start its server: launchers and the deploy/ files for each way to run it."""

from __future__ import annotations

from dataclasses import dataclass

from edgepack.measure.targets import TargetProfile

INSTALL_ROOT = "/opt/edgepack"  # where the service files expect the bundle to be copied
# NVIDIA's L4T JetPack container for JetPack 6 (L4T r36), the Jetson's own CUDA userland
JETSON_BASE_IMAGE = "nvcr.io/nvidia/l4t-jetpack:r36.4.0"


@dataclass(frozen=True)
class DeployContext:
    bundle_name: str
    model_id: str
    variant_kind: str
    engine: str
    model_path: str  # relative to the bundle
    context: int
    threads: int
    port: int
    target: TargetProfile
    has_wheels: bool


RUN_SH = """#!/bin/sh
# Start this bundle's local OpenAI-compatible server ({model_id}, {variant_kind}).
# EDGEPACK_HOST / EDGEPACK_PORT override the address; other arguments go to `edgepack serve`.
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ -x "$HERE/.venv/bin/edgepack" ]; then
  EDGEPACK="$HERE/.venv/bin/edgepack"   # installed by install.sh from wheels/
elif command -v edgepack >/dev/null 2>&1; then
  EDGEPACK="edgepack"
else
  echo "run.sh: edgepack is not installed here: run install.sh (a bundle built with --offline-wheels) or install" \
       "edgepack and put it on PATH" >&2
  exit 127
fi
exec "$EDGEPACK" serve "$HERE" --host "${{EDGEPACK_HOST:-127.0.0.1}}" --port "${{EDGEPACK_PORT:-{port}}}" "$@"
"""

RUN_BAT = """@echo off
rem Start this bundle's local OpenAI-compatible server ({model_id}, {variant_kind}).
rem EDGEPACK_HOST / EDGEPACK_PORT override the address; other arguments go to `edgepack serve`.
setlocal
set "HERE=%~dp0"
set "EDGEPACK=edgepack"
if exist "%HERE%.venv\\Scripts\\edgepack.exe" set "EDGEPACK=%HERE%.venv\\Scripts\\edgepack.exe"
if "%EDGEPACK_HOST%"=="" set "EDGEPACK_HOST=127.0.0.1"
if "%EDGEPACK_PORT%"=="" set "EDGEPACK_PORT={port}"
"%EDGEPACK%" serve "%HERE%." --host %EDGEPACK_HOST% --port %EDGEPACK_PORT% %*
"""

SYSTEMD_UNIT = """# systemd unit for {bundle_name}.
# Install: copy the bundle to {root}/{bundle_name}, run its install.sh (or install edgepack), then
#   sudo cp deploy/edgepack-{bundle_name}.service /etc/systemd/system/
#   sudo systemctl daemon-reload && sudo systemctl enable --now edgepack-{bundle_name}
[Unit]
Description=edgepack local OpenAI-compatible server: {model_id} ({variant_kind})
After=network.target

[Service]
Type=simple
ExecStart={root}/{bundle_name}/run.sh
Environment=EDGEPACK_HOST=127.0.0.1
Environment=EDGEPACK_PORT={port}
Environment=HF_HUB_OFFLINE=1
Environment=XDG_CACHE_HOME=/var/cache/edgepack-{bundle_name}
CacheDirectory=edgepack-{bundle_name}
DynamicUser=yes
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
Restart=on-failure
RestartSec=3
# the target's memory budget ({budget_gib:g} GiB: {budget_reason})
MemoryMax={budget_mib}M

[Install]
WantedBy=multi-user.target
"""

LAUNCHD_PLIST = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- launchd agent for {bundle_name}. Install: copy the bundle to {root}/{bundle_name}, run its install.sh, then
     cp deploy/com.edgepack.{bundle_name}.plist ~/Library/LaunchAgents/ &&
     launchctl load ~/Library/LaunchAgents/com.edgepack.{bundle_name}.plist -->
<plist version="1.0">
<dict>
  <key>Label</key><string>com.edgepack.{bundle_name}</string>
  <key>ProgramArguments</key>
  <array><string>{root}/{bundle_name}/run.sh</string></array>
  <key>EnvironmentVariables</key>
  <dict>
    <key>EDGEPACK_HOST</key><string>127.0.0.1</string>
    <key>EDGEPACK_PORT</key><string>{port}</string>
    <key>HF_HUB_OFFLINE</key><string>1</string>
  </dict>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>
  <key>StandardErrorPath</key><string>/tmp/edgepack-{bundle_name}.log</string>
</dict>
</plist>
"""

DOCKERFILE = """# Container for {bundle_name}. Build from the bundle folder:
#   docker build -t edgepack-{image_name} -f deploy/Dockerfile .
#   docker run {run_flags}-p {port}:{port} edgepack-{image_name}
FROM {base}
{toolchain}WORKDIR /bundle
COPY . /bundle
ENV HF_HUB_OFFLINE=1
{install}
# inside a container the server must listen on all interfaces for -p to reach it
ENV EDGEPACK_HOST=0.0.0.0 EDGEPACK_PORT={port}
EXPOSE {port}
CMD ["/bundle/run.sh"]
"""

OLLAMA_MODELFILE = """# Ollama Modelfile for {bundle_name}. From the bundle folder:
#   ollama create {model_id_lower} -f deploy/Modelfile
# The chat template comes from the GGUF's own metadata.
FROM ../{model_path}
PARAMETER num_ctx {context}
PARAMETER num_thread {threads}
"""


def _fill(template: str, ctx: DeployContext, **extra: object) -> str:
    return template.format(bundle_name=ctx.bundle_name, model_id=ctx.model_id, variant_kind=ctx.variant_kind,
                           port=ctx.port, root=INSTALL_ROOT, context=ctx.context, threads=ctx.threads,
                           model_path=ctx.model_path, **extra)


def _dockerfile(ctx: DeployContext) -> str:
    jetson = ctx.target.accelerator == "jetson-gpu"
    base = JETSON_BASE_IMAGE if jetson else f"python:{ctx.target.python_version}-slim"
    needs_compiler = ctx.engine == "llamacpp"  # llama-cpp-python is built from source on the device
    toolchain = ""
    if jetson:
        toolchain = ("RUN apt-get update && apt-get install -y --no-install-recommends python3-pip python3-venv "
                     "build-essential cmake && rm -rf /var/lib/apt/lists/*\n")
    elif needs_compiler:
        toolchain = ("RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake "
                     "&& rm -rf /var/lib/apt/lists/*\n")
    if ctx.has_wheels:
        install = "RUN sh install.sh"
    else:
        install = ("# no wheels/ in this bundle (build it with --offline-wheels for a self-contained image): edgepack "
                   "comes from\n# the package index pip is configured with\n"
                   "RUN python3 -m venv .venv && .venv/bin/pip install --no-cache-dir edgepack")
    if jetson and ctx.engine == "llamacpp":
        install = 'ENV CMAKE_ARGS="-DGGML_CUDA=on"\n' + install
    run_flags = "--runtime nvidia " if jetson else ""
    return _fill(DOCKERFILE, ctx, base=base, toolchain=toolchain, install=install, run_flags=run_flags,
                 image_name=ctx.bundle_name.lower())  # image names must be lower case


def deploy_files(ctx: DeployContext) -> dict[str, tuple[str, bool]]:
    """relative path -> (text, executable)."""
    files = {
        "run.sh": (_fill(RUN_SH, ctx), True),
        "run.bat": (_fill(RUN_BAT, ctx).replace("\n", "\r\n"), False),
        f"deploy/edgepack-{ctx.bundle_name}.service": (_fill(
            SYSTEMD_UNIT, ctx, budget_gib=ctx.target.memory_budget_gib,
            budget_reason=ctx.target.memory_budget_reason,
            budget_mib=int(ctx.target.memory_budget_gib * 1024)), False),
        f"deploy/com.edgepack.{ctx.bundle_name}.plist": (_fill(LAUNCHD_PLIST, ctx), False),
        "deploy/Dockerfile": (_dockerfile(ctx), False),
    }
    if ctx.variant_kind.startswith("gguf-"):
        files["deploy/Modelfile"] = (_fill(OLLAMA_MODELFILE, ctx, model_id_lower=ctx.model_id.lower()), False)
    return files
