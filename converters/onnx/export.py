"""HF -> ONNX FP32 with KV cache, through optimum-onnx's exporter (task text-generation-with-past)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from converters.architectures import architecture_for_config
from converters.hf_model import HFModelDir
from converters.logit_parity import LogitParity, check_logit_parity
from converters.onnx.grammar_vocab import write_grammar_vocab
from edgepack.core.errors import UnsupportedModelError
from edgepack.core.fileio import atomic_output_dir, refuse_existing

EXPORT_TASK = "text-generation-with-past"


def check_exportable(model: HFModelDir) -> None:
    from optimum.exporters.tasks import TasksManager

    architecture_for_config(model.config)  # the same families as the GGUF converter, or a refusal
    model_type = model.config["model_type"]
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, exporter="onnx",
                                                               library_name="transformers")
    except KeyError:
        tasks = {}
    if EXPORT_TASK not in tasks:
        raise UnsupportedModelError(f"optimum-onnx cannot export model_type {model_type!r} with a KV cache "
                                    f"({EXPORT_TASK}); use a GGUF kind for this model")


def export_onnx_fp32(model_path: Path, out_dir: Path, *, force: bool = False) -> LogitParity:
    """Write `out_dir` (model.onnx + config + tokenizer) and check its logits against transformers'."""
    from optimum.exporters.onnx import main_export

    refuse_existing(out_dir, force)
    model = HFModelDir(model_path)
    check_exportable(model)
    with atomic_output_dir(out_dir) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("optimum", "transformers", "torch.onnx"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # optimum writes the weights as external data by itself once the model passes protobuf's 2 GB limit
        main_export(str(model_path), output=tmp, task=EXPORT_TASK, device="cpu", do_validation=False)
        write_grammar_vocab(Path(model_path), tmp)  # the quantizers copy it with the other side files
        return check_logit_parity(tmp, Path(model_path))
