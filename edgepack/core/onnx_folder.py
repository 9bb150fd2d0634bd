"""What an ONNX variant folder holds (model.onnx, its config and tokenizer, and weights.json when our builder made
it), for `edgepack inspect`: read from the folder's JSON files, without loading the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgepack.core.errors import EdgepackError

MODEL_FILE = "model.onnx"
WEIGHTS_REPORT = "weights.json"  # written by converters/onnx/converter.py
GRAPH_KIND = "edgepack-decoder-gqa"  # our decode-optimized graph (converters/onnx/decoder_graph.py)
GRAPH_METADATA_KEY = "edgepack.graph"  # the model metadata that names it, which the ONNX engine reads
# the tokenizer as a vocabulary-only GGUF: llama.cpp's grammar sampler constrains the ONNX engine's output with it
GRAMMAR_VOCAB_FILE = "tokenizer.gguf"


@dataclass(frozen=True)
class OnnxSummary:
    path: Path
    graph: str  # our decode-optimized graph, or "optimum-onnx export"
    architecture: str
    parameter_count: int | None  # None: the folder has no weights.json to count from
    context_length: int | None
    has_chat_template: bool
    bytes: int
    quant_types: dict[str, float]  # precision -> share of the weights' bytes (empty without weights.json)
    plan: str | None


def is_onnx_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MODEL_FILE).is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise EdgepackError(f"{path} is not valid JSON: {exc}") from exc


def inspect_onnx_folder(path: Path) -> OnnxSummary:
    path = Path(path)
    if not is_onnx_folder(path):
        raise EdgepackError(f"{path} is not an ONNX variant: expected a folder with {MODEL_FILE}")
    config = _read_json(path / "config.json")
    weights = _read_json(path / WEIGHTS_REPORT)
    tensors = weights.get("tensors", [])
    parameters = sum(_count(t["shape"]) for t in tensors if t.get("bytes", 0) > 0) if tensors else None
    tokenizer_config = _read_json(path / "tokenizer_config.json")
    return OnnxSummary(
        path=path, graph=weights.get("graph", "optimum-onnx export"),
        architecture=str(config.get("model_type", "unknown")), parameter_count=parameters,
        context_length=config.get("max_position_embeddings"),
        has_chat_template=(path / "chat_template.jinja").is_file() or "chat_template" in tokenizer_config,
        bytes=sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
        quant_types={name: entry["share"] for name, entry in weights.get("bytes_by_precision", {}).items()},
        plan=weights.get("plan"))


def _count(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
