"""The text files a bundle ships to start its server: launchers and the deploy/ files for each way to run it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import one_line_problem, safe_name_problem
from edgepack.core.versions import EDGEPACK_VERSION
from edgepack.measure.device_values import value_problem
from edgepack.measure.targets import TargetProfile

INSTALL_ROOT = "/opt/edgepack"  # where the service files expect the bundle to be copied
# the key file a container or service is given to listen beyond loopback (run.sh refuses to without one)
CONTAINER_KEY_FILE = "/run/secrets/edgepack_api_key"
SAFE_RELATIVE_PATH = re.compile(r"(?!.*\.\.)[A-Za-z0-9_+][A-Za-z0-9._/+-]*")
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
# Beyond loopback the server requires an API key ('Authorization: Bearer KEY'), and run.sh refuses to start without
# one: EDGEPACK_API_KEY holds it, or EDGEPACK_API_KEY_FILE names a file holding it (or pass --api-key-file FILE).
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
HOST="${{EDGEPACK_HOST:-127.0.0.1}}"
KEYED=""
AFTER_HOST=""
for ARG in "$@"; do  # what the arguments ask for wins over the environment, as in `edgepack serve`
  if [ -n "$AFTER_HOST" ]; then HOST="$ARG"; AFTER_HOST=""; continue; fi
  case "$ARG" in
    --host) AFTER_HOST=1 ;;
    --host=*) HOST="${{ARG#--host=}}" ;;
    --api-key|--api-key=*|--api-key-file|--api-key-file=*) KEYED=1 ;;
  esac
done
if [ -n "${{EDGEPACK_API_KEY:-}}" ]; then
  # the key reaches the server in a file only this user can read, never on its command line (ps shows that)
  EDGEPACK_API_KEY_FILE="$(umask 077 && mktemp)"
  printf '%s\\n' "$EDGEPACK_API_KEY" > "$EDGEPACK_API_KEY_FILE"
fi
unset EDGEPACK_API_KEY
if [ -n "${{EDGEPACK_API_KEY_FILE:-}}" ]; then
  set -- --api-key-file "$EDGEPACK_API_KEY_FILE" "$@"
  KEYED=1
fi
case "$HOST" in
  127.0.0.1|localhost|::1|"[::1]") ;;
  *)
    if [ -z "$KEYED" ]; then
      echo "run.sh: refusing to serve on $HOST without an API key: anything that reaches it would have full" \\
           "access. Set EDGEPACK_API_KEY_FILE (a file holding the key) or EDGEPACK_API_KEY." >&2
      exit 2
    fi ;;
esac
exec "$EDGEPACK" serve "$HERE" --host "$HOST" --port "${{EDGEPACK_PORT:-{port}}}" "$@"
"""

RUN_BAT = """@echo off
rem Start this bundle's local OpenAI-compatible server ({model_id}, {variant_kind}).
rem EDGEPACK_HOST / EDGEPACK_PORT override the address; other arguments go to `edgepack serve`.
rem Beyond loopback the server requires an API key: EDGEPACK_API_KEY_FILE names a file holding it.
setlocal
set "HERE=%~dp0"
set "EDGEPACK=edgepack"
if exist "%HERE%.venv\\Scripts\\edgepack.exe" set "EDGEPACK=%HERE%.venv\\Scripts\\edgepack.exe"
if "%EDGEPACK_HOST%"=="" set "EDGEPACK_HOST=127.0.0.1"
if "%EDGEPACK_PORT%"=="" set "EDGEPACK_PORT={port}"
if not "%EDGEPACK_API_KEY_FILE%"=="" goto keyed
if "%EDGEPACK_HOST%"=="127.0.0.1" goto serve
if /i "%EDGEPACK_HOST%"=="localhost" goto serve
if "%EDGEPACK_HOST%"=="::1" goto serve
echo run.bat: refusing to serve on %EDGEPACK_HOST% without an API key: set EDGEPACK_API_KEY_FILE 1>&2
exit /b 2
:keyed
"%EDGEPACK%" serve "%HERE%." --host %EDGEPACK_HOST% --port %EDGEPACK_PORT% --api-key-file "%EDGEPACK_API_KEY_FILE%" %*
exit /b %ERRORLEVEL%
:serve
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
# loopback only; to listen beyond it, set EDGEPACK_HOST and give the server an API key (run.sh refuses the one
# without the other), e.g. with systemd's credentials:
#   LoadCredential=api-key:/etc/edgepack/{bundle_name}.key
#   Environment=EDGEPACK_API_KEY_FILE=%d/api-key
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
  <!-- the log goes to this user's own ~/Library/Logs (launchd expands no ~ or $HOME itself, so sh does) -->
  <array>
    <string>/bin/sh</string>
    <string>-c</string>
    <string>mkdir -p -m 700 "$HOME/Library/Logs/edgepack" &amp;&amp;
      exec {root}/{bundle_name}/run.sh 2&gt;&gt;"$HOME/Library/Logs/edgepack/{bundle_name}.log"</string>
  </array>
  <key>EnvironmentVariables</key>
  <dict>
    <key>EDGEPACK_HOST</key><string>127.0.0.1</string>
    <key>EDGEPACK_PORT</key><string>{port}</string>
    <key>HF_HUB_OFFLINE</key><string>1</string>
  </dict>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>
</dict>
</plist>
"""

DOCKERFILE = """# Container for {bundle_name}. Build from the bundle folder:
#   docker build -t edgepack-{image_name} -f deploy/Dockerfile .
# The server requires an API key ('Authorization: Bearer KEY') and does not start without one: a file holding it,
# mounted at {key_file} (or -e EDGEPACK_API_KEY=...):
#   docker run {run_flags}-p 127.0.0.1:{port}:{port} -v "$PWD/api-key:{key_file}:ro" edgepack-{image_name}
FROM {base}
{toolchain}WORKDIR /bundle
COPY . /bundle
ENV HF_HUB_OFFLINE=1
{install}
RUN useradd --create-home --shell /usr/sbin/nologin edgepack
USER edgepack
# inside a container the server must listen on all interfaces for -p to reach it, so run.sh requires the key
ENV EDGEPACK_HOST=0.0.0.0 EDGEPACK_PORT={port} EDGEPACK_API_KEY_FILE={key_file}
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


def _check_context(ctx: DeployContext) -> None:
    """What reaches the generated files (shell lines, unit names, a Dockerfile's FROM) must be what each file can
    hold as plain text; a bad value is refused naming where it came from, never written."""
    target = f"target {ctx.target.name} ({ctx.target.source or 'given'})"
    problems = [
        ("the bundle's name", ctx.bundle_name, safe_name_problem(ctx.bundle_name)),
        ("the model's name", ctx.model_id, one_line_problem(ctx.model_id)),
        ("the variant's kind", ctx.variant_kind, safe_name_problem(ctx.variant_kind)),
        ("the model's path", ctx.model_path, None if SAFE_RELATIVE_PATH.fullmatch(ctx.model_path) else
         "is not a relative path of letters, digits and . _ / + -"),
        (f"{target}'s python_version", ctx.target.python_version,
         value_problem("python version", ctx.target.python_version)),
    ]
    for what, value, problem in problems:
        if problem:
            raise EdgepackError(f"{what} {value!r} {problem}; refusing to write it into the bundle's deploy files")


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
                   f"RUN python3 -m venv .venv && .venv/bin/pip install --no-cache-dir edgepack=={EDGEPACK_VERSION}")
    if jetson and ctx.engine == "llamacpp":
        install = 'ENV CMAKE_ARGS="-DGGML_CUDA=on"\n' + install
    run_flags = "--runtime nvidia " if jetson else ""
    return _fill(DOCKERFILE, ctx, base=base, toolchain=toolchain, install=install, run_flags=run_flags,
                 image_name=ctx.bundle_name.lower(), key_file=CONTAINER_KEY_FILE)  # image names must be lower case


def deploy_files(ctx: DeployContext) -> dict[str, tuple[str, bool]]:
    """relative path -> (text, executable)."""
    _check_context(ctx)
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
