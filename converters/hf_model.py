"""Read a Hugging Face model directory: its config, its weights (lazily) and its tokenizer files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from edgepack.core.errors import EdgepackError, UnsupportedModelError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass(frozen=True)
class TensorRecord:
    """Where one weight lives and what it looks like, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


class HFModelDir:
    """A Hugging Face model directory. Tensors are memory-mapped and read one at a time."""

    def __init__(self, path: Path, *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise EdgepackError(f"{self.path} is not a directory; expected a Hugging Face model directory "
                                "(config.json, *.safetensors, tokenizer.json or tokenizer.model)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise EdgepackError(f"{self.path} has no config.json; expected a Hugging Face model directory")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise EdgepackError(f"{config_path} is not valid JSON: {exc}") from exc
        if not any((self.path / name).is_file() for name in TOKENIZER_FILES):
            raise EdgepackError(f"{self.path} has no tokenizer: expected tokenizer.json and/or tokenizer.model")
        self.allow_pickle = allow_pickle
        self.tensors: dict[str, TensorRecord] = self._index_tensors()

    # -- weights -----------------------------------------------------------------------------

    def _weight_files(self) -> tuple[list[Path], bool]:
        """The weight files and whether they are pickles."""
        if (self.path / SAFETENSORS_INDEX).is_file():
            return self._files_from_index(SAFETENSORS_INDEX), False
        if (self.path / SAFETENSORS_SINGLE).is_file():
            return [self.path / SAFETENSORS_SINGLE], False
        loose = sorted(self.path.glob("*.safetensors"))
        if loose:
            return loose, False
        pickles = []
        if (self.path / PICKLE_INDEX).is_file():
            pickles = self._files_from_index(PICKLE_INDEX)
        elif (self.path / PICKLE_SINGLE).is_file():
            pickles = [self.path / PICKLE_SINGLE]
        if pickles:
            if not self.allow_pickle:
                raise UnsupportedModelError(
                    f"{self.path} has only pickle weights ({pickles[0].name}); pickles can run code when loaded. "
                    "Convert them to safetensors, or pass --allow-pickle to load them with torch's weights_only=True")
            return pickles, True
        raise EdgepackError(f"{self.path} has no weights: expected model.safetensors, "
                            f"{SAFETENSORS_INDEX} with its shards, or (with --allow-pickle) {PICKLE_SINGLE}")

    def _files_from_index(self, index_name: str) -> list[Path]:
        index = json.loads((self.path / index_name).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        root = self.path.resolve()
        outside = [name for name in names if not isinstance(name, str) or Path(name).is_absolute() or "\\" in name
                   or root not in (root / name).resolve().parents]
        if outside:
            raise EdgepackError(f"{index_name} names shards outside the model folder: {', '.join(map(repr, outside))}; "
                                "a shard is a file name inside the folder, such as model-00001-of-00002.safetensors")
        missing = [name for name in names if not (self.path / name).is_file()]
        if missing:
            raise EdgepackError(f"{index_name} lists shards that are missing: {', '.join(missing)}")
        return [self.path / name for name in names]

    def _index_tensors(self) -> dict[str, TensorRecord]:
        files, is_pickle = self._weight_files()
        self._pickle_cache: dict[Path, dict[str, torch.Tensor]] = {}
        records: dict[str, TensorRecord] = {}
        for file in files:
            if is_pickle:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                self._pickle_cache[file] = state
                for name, tensor in state.items():
                    records[name] = TensorRecord(name, tuple(tensor.shape), tensor.dtype, file)
                continue
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():
                        tensor_slice = handle.get_slice(name)
                        dtype = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
                        if dtype is None:
                            raise UnsupportedModelError(
                                f"{file.name}: tensor {name} has dtype {tensor_slice.get_dtype()}; "
                                f"supported: {', '.join(sorted(_SAFETENSORS_DTYPES))}")
                        records[name] = TensorRecord(name, tuple(tensor_slice.get_shape()), dtype, file)
            except (OSError, SafetensorError) as exc:
                raise EdgepackError(f"{file} is not a readable safetensors file: {exc}") from exc
        return records

    def read_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor from its memory-mapped file."""
        record = self.tensors[name]
        if record.file in self._pickle_cache:
            return self._pickle_cache[record.file][name]
        with safe_open(record.file, framework="pt") as handle:
            return handle.get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows [start, stop) of one tensor. The file is mapped only while they are read, so the pages of a
        large tensor do not stay resident while it is converted block by block."""
        record = self.tensors[name]
        if record.file in self._pickle_cache:
            return self._pickle_cache[record.file][name][start:stop]
        with safe_open(record.file, framework="pt") as handle:
            return handle.get_slice(name)[start:stop].clone()

    @property
    def stored_dtype(self) -> str:
        counts: dict[str, int] = {}
        for record in self.tensors.values():
            key = str(record.dtype).removeprefix("torch.")
            counts[key] = counts.get(key, 0) + _numel(record.shape)
        return max(counts, key=counts.__getitem__) if counts else "unknown"

    @property
    def parameter_count(self) -> int:
        return sum(_numel(record.shape) for record in self.tensors.values())

    # -- tokenizer and chat template ------------------------------------------------------------

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EdgepackError(f"{path} is not valid JSON: {exc}") from exc

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        return self.read_json("tokenizer_config.json") or {}

    @property
    def chat_template(self) -> str | None:
        jinja = self.path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # a list of named templates; llama.cpp wants the default one
            named = {entry.get("name"): entry.get("template") for entry in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None:
            extra = self.read_json("chat_template.json")
            template = extra.get("chat_template") if extra else None
        return template


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
