"""`edgepack doctor` on this machine, and its verdict on a machine that lacks what the build needs."""

from __future__ import annotations

import json

import pytest
from cli_runner import run_edgepack

from edgepack.core.errors import EdgepackError
from edgepack.measure.doctor import DoctorOptions, doctor, require_healthy


def test_doctor_runs_every_engine_on_the_tiny_student_here(tmp_path):
    done = run_edgepack(["doctor", "--json"], timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    report = json.loads(done.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    assert report["healthy"] is True
    for engine, name in (("torch", "engine torch (reference)"), ("llamacpp", "engine gguf-q8_0"),
                         ("llamacpp", "engine gguf-q4_k_m"), ("onnxrt", "engine onnx-fp32")):
        assert checks[name]["status"] == "ok"
        assert checks[name]["detail"] == f"{engine} loaded it and generated 8 tokens in a child process"
    assert {"python", "torch", "llama.cpp build", "onnxruntime", "memory", "disk"} <= set(checks)


def test_a_machine_without_room_for_the_build_fails_with_what_to_do():
    report = doctor(DoctorOptions(run_engines=False, needed_disk_gib=1e9))
    (disk,) = [check for check in report.checks if check.name == "disk"]
    assert disk.status == "fail" and "EDGEPACK_CACHE" in disk.fix
    assert not report.healthy
    with pytest.raises(EdgepackError, match="disk"):
        require_healthy(report)
    assert doctor(DoctorOptions(run_engines=False, needed_disk_gib=0, needed_memory_gib=0)).healthy
