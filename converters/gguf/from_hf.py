"""Our HF -> GGUF converter (F32, F16, BF16), written on gguf-py.

Tensors are planned from the safetensors headers alone, then read (memory-mapped), transformed and written one
at a time, so peak memory stays near one tensor plus the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from converters.architectures import Architecture, architecture_for_config
from converters.gguf.hparams import HParams, read_hparams, rope_tensors, write_hparams
from converters.gguf.vocab import GGUFVocab, read_vocab, write_vocab
from converters.hf_model import HFModelDir
from edgepack.core.errors import EdgepackError, UnsupportedModelError
from edgepack.core.fileio import atomic_output_file, refuse_existing
from edgepack.core.progress import progress_bar
from edgepack.core.versions import EDGEPACK_VERSION, package_version

FLOAT_OUTPUT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
# Large tensors are read and converted in row blocks of about this size, so peak memory stays well below one
# tensor's size (the embedding is often the largest by far).
BLOCK_BYTES = 16 << 20
CONVERTER_NAME = f"edgepack {EDGEPACK_VERSION} hf->gguf (gguf-py {package_version('gguf')})"


@dataclass(frozen=True)
class PlannedTensor:
    gguf_name: str
    shape: tuple[int, ...]  # numpy (row-major) shape of the data written
    ggml_type: gguf.GGMLQuantizationType
    blocks: Callable[[], Iterator[torch.Tensor]]  # the transformed tensor as consecutive row blocks

    @property
    def nbytes(self) -> int:
        count = int(np.prod(self.shape)) if self.shape else 1
        return count * (4 if self.ggml_type == gguf.GGMLQuantizationType.F32 else 2)


def permute_for_interleaved_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores each head's q/k rows as [first halves | second halves] (rotate-half rope); llama.cpp's LLAMA
    rope wants them interleaved in pairs. Works for weights (2-D) and biases (1-D)."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *rest)
            .swapaxes(1, 2)
            .reshape(weight.shape))


def unpermute_from_interleaved_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_for_interleaved_rope (used by the GGUF -> HF importer)."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *rest)
            .swapaxes(1, 2)
            .reshape(weight.shape))


def gguf_tensor_name(hf_name: str, arch: Architecture, name_map: gguf.TensorNameMap) -> str | None:
    """The name our converter writes the HF tensor `hf_name` under (blk.0.attn_q.weight for
    model.layers.0.self_attn.q_proj.weight); None when it has none. `name_map`: gguf.get_tensor_name_map of the
    architecture and layer count."""
    return arch.extra_renames.get(hf_name) or name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def plan_tensors(model: HFModelDir, arch: Architecture, hp: HParams, outtype: str) -> list[PlannedTensor]:
    target_type = FLOAT_OUTPUT_TYPES[outtype][0]
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, hp.num_layers)
    planned: list[PlannedTensor] = []
    unknown: list[str] = []
    for hf_name, record in model.tensors.items():
        if hf_name.endswith(arch.skip_tensor_suffixes):
            continue
        if hf_name == "lm_head.weight" and hp.tie_embeddings:
            continue  # llama.cpp reuses token_embd when the output tensor is absent
        gguf_name = gguf_tensor_name(hf_name, arch, name_map)
        if gguf_name is None:
            unknown.append(hf_name)
            continue
        ggml_type = target_type if len(record.shape) >= 2 else gguf.GGMLQuantizationType.F32
        planned.append(PlannedTensor(gguf_name, record.shape, ggml_type,
                                     _block_reader(model, hf_name, gguf_name, arch, hp)))
    if unknown:
        shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise UnsupportedModelError(f"{len(unknown)} tensor(s) have no GGUF name for {arch.name}: {shown}")
    for name, values in rope_tensors(model.config, hp).items():
        tensor = torch.from_numpy(values)
        planned.append(PlannedTensor(name, tuple(values.shape), gguf.GGMLQuantizationType.F32,
                                     lambda tensor=tensor: iter([tensor])))
    return planned


def _block_reader(model: HFModelDir, hf_name: str, gguf_name: str, arch: Architecture, hp: HParams
                  ) -> Callable[[], Iterator[torch.Tensor]]:
    is_query = arch.permute_qk and ".attn_q." in gguf_name
    is_key = arch.permute_qk and ".attn_k." in gguf_name
    is_norm = bool(arch.norm_offset) and hf_name.endswith("norm.weight")

    def whole() -> Iterator[torch.Tensor]:
        tensor = model.read_tensor(hf_name)
        if is_query:
            tensor = permute_for_interleaved_rope(tensor, hp.num_heads)
        elif is_key:
            tensor = permute_for_interleaved_rope(tensor, hp.num_kv_heads)
        if is_norm:
            tensor = tensor.to(torch.float32) + arch.norm_offset
        yield tensor

    def in_row_blocks() -> Iterator[torch.Tensor]:
        record = model.tensors[hf_name]
        rows = record.shape[0]
        row_bytes = max(1, int(np.prod(record.shape[1:])) * record.dtype.itemsize)
        step = max(1, BLOCK_BYTES // row_bytes)
        for start in range(0, rows, step):
            yield model.read_rows(hf_name, start, min(rows, start + step))

    needs_whole = is_query or is_key or is_norm or len(model.tensors[hf_name].shape) < 2
    return whole if needs_whole else in_row_blocks


def _as_output_array(tensor: torch.Tensor, ggml_type: gguf.GGMLQuantizationType) -> np.ndarray:
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    # BF16 has no numpy dtype: write its raw bytes
    return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)


def _write_tensor_blocks(writer: gguf.GGUFWriter, item: PlannedTensor) -> None:
    """Write one tensor's data block by block, aligned and padded exactly as GGUFWriter.write_tensor_data does."""
    out = writer.fout[0]
    writer.write_padding(out, out.tell())
    written = 0
    for block in item.blocks():
        array = _as_output_array(block, item.ggml_type)
        array.tofile(out)
        written += array.nbytes
    if written != item.nbytes:
        raise EdgepackError(f"{item.gguf_name}: wrote {written} bytes, expected {item.nbytes}")
    writer.write_padding(out, written)


def write_general_metadata(writer: gguf.GGUFWriter, model: HFModelDir, outtype: str,
                           extra_metadata: dict[str, str] | None) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    name = model.config.get("_name_or_path") or model.path.name
    writer.add_name(Path(str(name)).name or model.path.name)
    writer.add_basename(model.path.name)
    writer.add_size_label(gguf.size_label(model.parameter_count, 0, 0, 0))
    writer.add_file_type(FLOAT_OUTPUT_TYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("edgepack.converter", CONVERTER_NAME)
    for key, value in (extra_metadata or {}).items():
        writer.add_string(key, value)


def convert_hf_to_gguf(model_path: Path, out_path: Path, *, outtype: str = "f16", force: bool = False,
                       allow_pickle: bool = False, extra_metadata: dict[str, str] | None = None,
                       show_progress: bool = True, vocab_only: bool = False) -> GGUFVocab:
    """Write `out_path` (a GGUF of `outtype`) from a Hugging Face directory. Returns the vocabulary written.
    `vocab_only`: the metadata and tokenizer without any tensor (what llama.cpp loads with vocab_only, ~2 MB)."""
    if outtype not in FLOAT_OUTPUT_TYPES:
        raise EdgepackError(f"unknown GGUF output type {outtype!r}; accepted: {', '.join(FLOAT_OUTPUT_TYPES)}")
    refuse_existing(out_path, force)
    model = HFModelDir(Path(model_path), allow_pickle=allow_pickle)
    arch = architecture_for_config(model.config)
    hp = read_hparams(model.config)
    vocab = read_vocab(model, hp.vocab_size)
    planned = [] if vocab_only else plan_tensors(model, arch, hp, outtype)

    with atomic_output_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.name)
        write_general_metadata(writer, model, outtype, extra_metadata)
        write_hparams(writer, arch, model.config, hp)
        write_vocab(writer, vocab)
        for item in planned:
            if item.ggml_type == gguf.GGMLQuantizationType.BF16:
                byte_shape = (*item.shape[:-1], item.shape[-1] * 2)
                writer.add_tensor_info(item.gguf_name, byte_shape, np.dtype(np.uint8), item.nbytes,
                                       raw_dtype=item.ggml_type)
            else:
                dtype = np.float32 if item.ggml_type == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(item.gguf_name, item.shape, np.dtype(dtype), item.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        shown = show_progress and bool(planned)
        with progress_bar(f"{out_path.name}: writing tensors", len(planned), shown) as advance:
            for item in planned:
                _write_tensor_blocks(writer, item)
                advance(1)
        writer.close()
    return vocab
