"""The same `edgepack distill` on several processes: the shipped accelerate configs (GPUs) load, and two CPU processes
started by torchrun (DDP over gloo, which accelerate picks on CPUs) train one student together."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from serving_helpers import free_port

CONFIGS = Path(__file__).resolve().parents[2] / "edgepack" / "distill" / "accelerate"


@pytest.mark.parametrize(("name", "kind", "processes"), [
    ("gpus_ddp.yaml", "MULTI_GPU", 8), ("gpus_fsdp.yaml", "FSDP", 8), ("gpus_deepspeed_zero2.yaml", "DEEPSPEED", 8)])
def test_every_shipped_accelerate_config_loads(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert str(config.distributed_type).endswith(kind) and config.num_processes == processes
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2


def test_two_cpu_processes_train_one_student(tiny_model, tmp_path):
    from edgepack.student.tiny import TRAINING_TEXT

    (tmp_path / "train.txt").write_text(TRAINING_TEXT * 4, encoding="utf-8")
    (tmp_path / "held_out.txt").write_text("A quiet evening by the harbour, with boats and gulls. " * 20)
    out = tmp_path / "student"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "edgepack", "distill", "--teacher", str(tiny_model("llama-bpe")),
               "--from-teacher", "--keep-layers", "1",
               "--data", str(tmp_path / "train.txt"), "--seq-len", "64", "--batch-size", "2", "--max-steps", "2",
               "--eval-text", str(tmp_path / "held_out.txt"), "--eval-windows", "1", "--no-behaviour",
               "--threads", "1", "--out", str(out), "--json"]
    # a session of its own, so a hang (a barrier one process missed) is killed whole: torchrun and both workers
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")})
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"two-process distillation did not finish in 300 s:\n{stderr[-3000:]}") from None
    assert process.returncode == 0, stderr[-3000:]
    record = json.loads(stdout)  # one report: the main process's
    assert record["settings"]["processes"] == 2 and record["steps"] == 2
    # each step: 2 sequences in each of the 2 processes, up to 63 scored tokens each
    assert 2 * 2 * 2 * 16 < record["tokens_trained"] <= 2 * 2 * 2 * 63
    assert (out / "config.json").is_file() and json.loads((out / "distill.json").read_text())["steps"] == 2
