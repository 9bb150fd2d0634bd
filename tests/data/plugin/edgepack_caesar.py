"""A plugin as a third party would write one: a new format ("caesar") with its converter, and a new engine that
runs it, each registered through an entry point (tests/test_plugins.py writes the distribution's metadata).

A caesar-N variant predicts that the byte after byte b is b + N: a model simple enough that the test knows its
output by hand. caesar-13 is the fault injected on purpose: its engine aborts the process as it loads (as a
native library does on a failed assertion), so tests can check that a crash rejects one variant and nothing
else."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from converters.registry import ConvertOptions
from edgepack.core.artifacts import Variant
from edgepack.core.errors import EdgepackError
from runtimes.base import LoadOptions, Runtime

SUFFIX = ".caesar"


class CaesarConverter:
    name: ClassVar[str] = "caesar"
    default_kinds: ClassVar[tuple[str, ...]] = ("caesar-1",)
    engines: ClassVar[tuple[str, ...]] = ("caesar",)

    def describe_kinds(self) -> str:
        return "caesar-1 ... caesar-25"

    def handles(self, kind: str) -> bool:
        prefix, _, shift = kind.partition("-")
        return prefix == "caesar" and shift.isdigit() and 1 <= int(shift) <= 25

    def cache_options(self, kind: str, options: ConvertOptions) -> dict[str, Any]:
        return {}

    def convert(self, model_path: Path, kinds: list[str], out_dir: Path, options: ConvertOptions) -> list[Variant]:
        variants = []
        for kind in kinds:
            path = out_dir / f"{kind}{SUFFIX}"
            path.write_text(f"{kind.partition('-')[2]}\n{Path(model_path).name}\n")
            variants.append(Variant(kind=kind, path=path, files=(path.name,), bytes=path.stat().st_size,
                                    sha256=hashlib.sha256(path.read_bytes()).hexdigest(), converter="caesar 0.1"))
        return variants


CAESAR_CONVERTER = CaesarConverter()


class CaesarRuntime(Runtime):
    name = "caesar"

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return Path(path).suffix == SUFFIX

    def __init__(self, path: Path, options: LoadOptions | None = None) -> None:
        if not self.can_load(path):
            raise EdgepackError(f"{path} is not a {SUFFIX} file")
        self.path = Path(path)
        self.shift = int(self.path.read_text().split()[0])
        if self.shift == 13:
            os.abort()
        self.context_length = (options or LoadOptions()).context_length or 256
        self.eos_token_ids = frozenset()
        self.device = "cpu"
        self._last = 0

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return "".join(message["content"] for message in messages)

    def _next(self, token: int) -> np.ndarray:
        logits = np.zeros(256, dtype=np.float32)
        logits[(token + self.shift) % 256] = 10.0
        return logits

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        return np.stack([self._next(token) for token in token_ids])

    def memory_bytes(self) -> int:
        return self.path.stat().st_size

    def _prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        return self._next(prompt_ids[-1])

    def _step(self, token_id: int) -> np.ndarray:
        return self._next(token_id)
