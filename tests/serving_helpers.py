"""What the server and router tests share: the tiny chat model they serve, opened under a chosen name."""

from __future__ import annotations

from pathlib import Path

from edgepack.serve.model import LocalModel, load

MODEL_ID = "tiny-chat"
CONTEXT = 256
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hello to the sea."}]


def open_model(path: Path, model_id: str = MODEL_ID, cls: type[LocalModel] = LocalModel,
               context: int = CONTEXT) -> LocalModel:
    loaded = load(path, context=context)
    return cls(loaded.runtime, model_id)
