"""`edgepack distill` end to end on tiny models: logit distillation lowers the student's KL divergence to the
teacher, the teacher's targets are cached, a killed run resumes, bad input is refused before anything is written,
sequence-level distillation learns from a teacher behind `edgepack serve`, and the student goes through build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_edgepack, wait_until_healthy
from serving_helpers import free_port, wait_until
from synth_models import TINY_MODELS, build_bpe_tokenizer

from edgepack.student.tiny import TRAINING_TEXT, write_random_weights

HELD_OUT = ("Evening fog rolled over the harbour while the ferry waited for the last passengers. A dog barked twice "
            "at the gulls, and the captain checked the weather report one more time before the long crossing. ") * 6


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A 4-layer tiny llama (byte-level BPE, ChatML template), random weights."""
    out = tmp_path_factory.mktemp("distill-teacher")
    _, overrides = TINY_MODELS["llama-bpe"]
    write_random_weights(out, {**overrides, "num_hidden_layers": 4}, build_bpe_tokenizer(out), seed=11)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill-files")
    (root / "train.txt").write_text(TRAINING_TEXT * 8, encoding="utf-8")
    (root / "held_out.txt").write_text(HELD_OUT, encoding="utf-8")
    (root / "empty.txt").write_text("  \n", encoding="utf-8")
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in [
        {"prompt": "Say something about ships."},
        {"messages": [{"role": "user", "content": "Name a river."}]},
        {"prompt": "Count to three."}]) + "\n", encoding="utf-8")
    return {p.stem: p for p in root.iterdir()}


def distill_args(teacher: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--from-teacher", "--keep-layers", "2", "--data",
            str(files["train"]), "--seq-len", "64", "--batch-size", "4", "--lr", "1e-3", "--eval-text",
            str(files["held_out"]), "--eval-windows", "2", "--no-behaviour", "--out", str(out), *extra]


def test_logit_distillation_lowers_the_kld_to_the_teacher_and_reuses_the_teachers_targets(teacher, files, tmp_path):
    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")}
    # pure distillation (alpha 1): the teacher's random weights are no model of the training text, so cross-entropy
    # on that text would pull the student away from it
    first = run_edgepack(distill_args(teacher, files, tmp_path / "s1", "--max-steps", "30", "--eval-every", "10",
                                      "--alpha", "1", "--json"), env, check=True)
    record = json.loads(first.stdout)
    assert record["steps"] == 30 and record["teacher_cache_hit"] is False
    assert [e["step"] for e in record["evaluations"]] == [0, 10, 20, 30]
    assert record["student"]["kept_layers"] == [0, 3]
    kld = [e["kld_mean"] for e in record["evaluations"]]  # 0.878, 0.776, 0.689, 0.667 when this was written
    assert kld[-1] < 0.85 * kld[0] and kld[1] < kld[0], kld
    assert record["losses"][-1][1] < record["losses"][0][1]
    saved = json.loads((tmp_path / "s1" / "distill.json").read_text())
    assert saved["after"] == record["after"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "report.md", "learning_curve.png"} <= \
        {p.name for p in (tmp_path / "s1").iterdir()}
    assert not (tmp_path / "s1" / ".work").exists()
    report = (tmp_path / "s1" / "report.md").read_text()
    assert "| mean KLD to the teacher |" in report and "learning_curve.png" in report
    # a second student on the same teacher, data and k reads the teacher's targets from the cache
    second = run_edgepack(distill_args(teacher, files, tmp_path / "s2", "--max-steps", "2", "--alpha", "1",
                                       "--loss", "jsd", "--json"), env, check=True)
    assert json.loads(second.stdout)["teacher_cache_hit"] is True
    # cross-entropy only (alpha 0) needs no teacher targets at all
    third = run_edgepack(distill_args(teacher, files, tmp_path / "s3", "--max-steps", "2", "--alpha", "0",
                                      "--json"), env, check=True)
    assert json.loads(third.stdout)["teacher_cache_hit"] is None


@pytest.mark.slow  # a whole run, killed and resumed: about a minute
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(teacher, files, tmp_path):
    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")}
    steps = ["--max-steps", "12", "--save-every", "4", "--eval-every", "1000"]
    whole = run_edgepack(distill_args(teacher, files, tmp_path / "whole", *steps, "--json"), env, check=True)
    expected = json.loads(whole.stdout)["losses"]
    out = tmp_path / "killed"
    # evaluating at every step slows the run enough to kill it part-way (evaluations do not touch training state)
    process = subprocess.Popen([sys.executable, "-m", "edgepack", *distill_args(teacher, files, out, *steps[:4],
                                "--eval-every", "1")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: any((out / ".work").glob("checkpoint-*/state.json")), 120, "no checkpoint was written")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (out / "config.json").exists()  # nothing that looks like a finished student
    again = run_edgepack(distill_args(teacher, files, out, *steps, "--json"), env)
    assert again.returncode != 0 and "--resume" in again.stderr  # refuses to start over the unfinished run
    resumed = run_edgepack(distill_args(teacher, files, out, *steps, "--resume", "--json"), env, check=True)
    record = json.loads(resumed.stdout)
    assert record["steps"] == 12 and record["resumed_at_steps"] and record["resumed_at_steps"][0] % 4 == 0
    assert [s for s, _ in record["losses"]] == list(range(1, 13))
    assert [v for _, v in record["losses"]] == pytest.approx([v for _, v in expected], rel=1e-3)


@pytest.mark.parametrize(("extra", "message"), [
    (["--data", "EMPTY"], "holds no text"),
    (["--seq-len", "4096"], "longer than the student's context (512"),
    (["--data", "MISSING"], "does not exist"),
    (["--mode", "sequence"], "--mode sequence trains on the teacher's answers"),
    (["--epochs", "1"], "--max-steps or --epochs, not both"),
])
def test_bad_input_is_refused_before_anything_is_written(teacher, files, tmp_path, extra, message):
    swap = {"EMPTY": str(files["empty"]), "MISSING": str(tmp_path / "nope.txt")}
    args = distill_args(teacher, files, tmp_path / "out", "--max-steps", "2")
    if extra[0] == "--data":
        args[args.index("--data") + 1] = swap[extra[1]]
    else:
        args += [swap.get(x, x) for x in extra]
    done = run_edgepack(args, {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")})
    assert done.returncode != 0
    assert message in " ".join(done.stderr.split()), done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_student_with_another_tokenizer_is_refused_for_logits_and_a_down_teacher_url_named(tiny_model, files,
                                                                                              tmp_path):
    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")}
    other = run_edgepack(["distill", "--teacher", str(tiny_model("llama-bpe")), "--student",
                          str(tiny_model("llama-spm")), "--data", str(files["train"]), "--max-steps", "1",
                          "--out", str(tmp_path / "a")], env)
    assert other.returncode != 0 and "different vocabularies" in other.stderr and "--mode sequence" in other.stderr
    assert not (tmp_path / "a").exists()
    down = run_edgepack(["distill", "--teacher-url", f"http://127.0.0.1:{free_port()}/v1", "--teacher-model", "m",
                         "--mode", "sequence", "--student", str(tiny_model("llama-bpe")), "--max-steps", "1",
                         "--out", str(tmp_path / "b")], env)
    assert down.returncode != 0 and "cannot be reached" in down.stderr
    assert not (tmp_path / "b").exists()


def test_sequence_distillation_learns_from_a_teacher_behind_edgepack_serve(tiny_gguf, tiny_model, files, tmp_path):
    import openai

    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")}
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "edgepack", "serve", str(tiny_gguf), "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, server, timeout=120)
        model_id = openai.OpenAI(base_url=f"{url}/v1", api_key="x").models.list().data[0].id
        args = ["distill", "--teacher-url", f"{url}/v1", "--teacher-model", model_id, "--mode", "sequence",
                "--student", str(tiny_model("llama-bpe")), "--prompts", str(files["prompts"]), "--max-answer-tokens",
                "12", "--max-steps", "3", "--batch-size", "2", "--eval-text", str(files["held_out"]), "--json"]
        first = json.loads(run_edgepack([*args, "--out", str(tmp_path / "s1")], env, check=True).stdout)
        assert first["teacher"]["kind"] == "endpoint" and first["teacher_answers_cache_hit"] is False
        assert first["data"]["prompts_count"] == 3 and first["data"]["sequences"] == 3
        assert first["settings"]["mode"] == "sequence"
        assert first["steps"] == 3 and first["losses"]
        assert first["held_out"]["positions"] == 0  # no teacher weights here to read held-out text with
        second = json.loads(run_edgepack([*args, "--out", str(tmp_path / "s2")], env, check=True).stdout)
        assert second["teacher_answers_cache_hit"] is True
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_logit_distillation_on_the_teachers_answers_with_lora_when_no_data_is_given(teacher, files, tmp_path):
    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")}
    done = run_edgepack(["distill", "--teacher", str(teacher), "--from-teacher", "--keep-layers", "0.5",
                         "--prompts", str(files["prompts"]), "--max-answer-tokens", "10", "--max-steps", "2",
                         "--lora", "4", "--eval-text", str(files["held_out"]), "--no-behaviour",
                         "--out", str(tmp_path / "s"), "--json"], env, check=True)
    record = json.loads(done.stdout)
    assert record["data"]["prompts_count"] == 3 and record["teacher_cache_hit"] is False
    assert record["settings"]["lora_rank"] == 4
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s" / "model.safetensors"), "pt") as weights:  # merged: plain weight names
        assert not [k for k in weights.keys() if "lora" in k]


@pytest.mark.slow  # distils, then builds: about half a minute
def test_a_distilled_student_goes_through_build_and_its_bundle_says_how_it_was_made(teacher, files, tmp_path):
    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")}
    student = tmp_path / "student"
    run_edgepack(distill_args(teacher, files, student, "--max-steps", "2", "--alpha", "1"), env, check=True)
    done = run_edgepack(["build", str(student), "--target", "host", "--formats", "gguf", "--no-behaviour",
                         "--eval-text", str(files["held_out"]), "--out", str(tmp_path / "dist"), "--json"], env,
                        check=True)
    bundle = Path(json.loads(done.stdout)["bundle"])
    manifest = json.loads((bundle / "edgepack.json").read_text())
    distillation = manifest["model"]["distillation"]
    record = json.loads((student / "distill.json").read_text())
    assert distillation["teacher"]["name"] == teacher.name and distillation["steps"] == 2
    assert distillation["after"] == record["after"] and "losses" not in distillation
    report = (bundle / "report.md").read_text()
    assert f"- Distilled by edgepack from {teacher.name} (logits mode, 2 steps" in report
    assert f"{record['after']['kld_mean']:.4f} after" in report


def test_qlora_trains_adapters_on_a_4bit_base_and_merges_them_into_the_full_precision_weights(teacher, files, tmp_path):
    """--qlora: the adapters learn against NF4 weights, and the student written is the float32 start plus the merged
    adapters: every linear weight moved by a matrix of rank at most --lora (linear algebra, not our code, says so),
    nothing else moved, and the student is closer to the teacher than where it started."""
    pytest.importorskip("bitsandbytes")
    import torch
    from safetensors.torch import load_file

    env = {**os.environ, "EDGEPACK_CACHE": str(tmp_path / "cache")}
    done = run_edgepack(distill_args(teacher, files, tmp_path / "q", "--max-steps", "8", "--eval-every", "8",
                                     "--alpha", "1", "--lr", "5e-3", "--lora", "2", "--qlora", "--keep-checkpoints",
                                     "--json"), env, check=True)
    record = json.loads(done.stdout)
    assert record["settings"]["qlora"] is True and record["settings"]["lora_rank"] == 2
    # 2 kept layers x 7 projections (q, k, v, o, gate, up, down) in 4 bits; the output head stays float32
    assert record["settings"]["base_weights"] == "NF4 (bitsandbytes), 14 linear layers"
    assert record["after"]["kld_mean"] < record["before"]["kld_mean"]
    # the pruned start the adapters were trained from (its weights as the student began)
    start = load_file(str(tmp_path / "q" / ".work" / "initial-student" / "model.safetensors"))
    merged = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert set(merged) == set(start)
    moved = {name for name in merged if not torch.equal(merged[name], start[name])}
    assert moved and all(name.endswith("proj.weight") for name in moved), sorted(moved)
    for name in moved:
        delta = (merged[name].double() - start[name].double())
        assert torch.linalg.matrix_rank(delta, rtol=1e-6).item() <= 2, name


def test_qlora_needs_a_lora_rank(teacher, files, tmp_path):
    from edgepack.core.errors import EdgepackError
    from edgepack.distill.options import DistillOptions
    from edgepack.distill.run import distill

    options = DistillOptions(out=tmp_path / "q", teacher=teacher, keep_layers="2", data=(files["train"],),
                             max_steps=2, qlora=True)
    with pytest.raises(EdgepackError, match="--qlora trains low-rank adapters on a 4-bit base"):
        distill(options)
    assert not (tmp_path / "q").exists()
