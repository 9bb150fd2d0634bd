"""A model loaded for serving: a verified bundle, or a variant path directly.

The server (edgepack.serve.app) runs on a ModelSession; `edgepack.load` returns the richer LocalModel
(edgepack.serve.model). llama.cpp and our ONNX graph generate for several callers at once (runtimes.batching);
any other engine runs one generation at a time, and callers wait on a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from edgepack.core.errors import EdgepackError
from runtimes.base import Device, GenerationChunk, GenerationOptions, LoadOptions, Runtime
from runtimes.chat_templates import DEFAULT_CHAT_TEMPLATE, NAMED_CHAT_TEMPLATES

# Generations served at once on an engine that batches (llama.cpp): on this project's 2-core CPU, 4 streams decode
# together at 2.0x one stream's rate (benchmarks.server; 8 in-process: 2.5x). Each holds its own context of KV cache.
DEFAULT_PARALLEL = 4


@dataclass(frozen=True)
class ServeDefaults:
    model_id: str
    model_path: Path
    engine: str | None
    context: int | None
    threads: int | None
    device: Device = "cpu"
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int | None = None  # None: DEFAULT_PARALLEL
    chat_template: str | None = None  # used instead of the model's own (a bundle's chat_template.jinja)


def defaults_for(path: Path) -> ServeDefaults:
    """A bundle (verified first; one that fails is refused) gives its manifest's server settings; a variant path
    gives the engine's own defaults."""
    from edgepack.bundle.inspect import is_bundle

    path = Path(path)
    if not path.exists():
        raise EdgepackError(f"{path} does not exist; expected a bundle directory or a variant (.gguf file, ONNX "
                            "directory)")
    if path.is_dir() and is_bundle(path):
        from edgepack.bundle.verify import verified_manifest

        # raises BundleInvalidError (exit 7) with what is wrong; the paths read below are the ones it checked, each
        # one of the bundle's own listed files
        server = verified_manifest(path)["server"]
        return ServeDefaults(model_id=server["model_id"], model_path=path / server["model_path"],
                             engine=server["engine"], context=server["context"], threads=server["threads"],
                             device=server["device"], host=server["host"], port=server["port"],
                             parallel=server.get("parallel"),
                             chat_template=(path / server["chat_template"]).read_text(encoding="utf-8")
                             if server.get("chat_template") else None)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        raise EdgepackError(f"{path} is a bundle archive: extract it first (tar xzf) and serve the folder")
    return ServeDefaults(model_id=path.stem if path.is_file() else path.name, model_path=path, engine=None,
                         context=None, threads=None)


class ModelSession:
    """One loaded engine. An engine that batches (llama.cpp) takes generations from many threads at once; on any
    other, a lock lets one generation run at a time."""

    def __init__(self, runtime: Runtime, model_id: str, defaults: ServeDefaults | None = None,
                 device_note: str | None = None) -> None:
        self.runtime = runtime
        self.model_id = model_id
        self.defaults = defaults
        self.device_note = device_note  # why the model runs on another device than the one asked for
        self._lock = threading.Lock()

    @property
    def context_length(self) -> int:
        return self.runtime.context_length

    def has_chat_template(self) -> bool:
        return self.runtime.chat_template_text() is not None

    def chat_template_text(self) -> str | None:
        return self.runtime.chat_template_text()

    @property
    def concurrency(self) -> int:
        """Generations that run at once."""
        return self.runtime.parallel if self.runtime.generates_concurrently else 1

    def prompt_ids(self, prompt: str | None = None, messages: list[dict] | None = None,
                   tools: list[dict] | None = None, limit: int | None = None,
                   cancel: threading.Event | None = None) -> list[int]:
        """A chat's or a raw prompt's tokens; past `limit` tokens PromptTooLong, once `cancel` is set
        PromptCancelled (runtimes.prompt_tokens)."""
        if messages is not None:
            return self.runtime.chat_prompt_ids(messages, tools, limit=limit, cancel=cancel)
        return self.runtime.prompt_ids(prompt or "", limit=limit, cancel=cancel)

    def stream_ids(self, prompt_ids: list[int], options: GenerationOptions,
                   cancel: threading.Event | None = None) -> Iterator[GenerationChunk]:
        """Stream from token ids, holding the engine for the whole generation."""
        self.runtime.check_prompt_fits(prompt_ids, 1)
        if self.runtime.generates_concurrently:
            yield from self.runtime.generate(prompt_ids, options, cancel)
            return
        with self._lock:
            yield from self.runtime.generate(prompt_ids, options, cancel)

    def submit(self, prompt_ids: list[int], options: GenerationOptions,
               emit: Callable[[GenerationChunk | BaseException], None], cancel: threading.Event) -> bool:
        """Start a generation on the engine's own thread (a batching engine has one), its chunks handed to `emit`
        there, the last with a finish_reason, or the exception that ended it. False where the engine has no such
        thread: the caller then runs `stream_ids` on a thread of its own."""
        if not self.runtime.generates_concurrently:
            return False
        self.runtime.check_prompt_fits(prompt_ids, 1)
        self.runtime.scheduler().submit(prompt_ids, options, emit, cancel)
        return True

    def close(self) -> None:
        self.runtime.close()



def open_session(defaults: ServeDefaults, threads: int | None = None, context: int | None = None,
                 device: Device | None = None, cls: type[ModelSession] | None = None,
                 parallel: int | None = None, chat_template: str | None = None) -> ModelSession:
    """Open what `defaults_for` described (and, for a bundle, verified). A GPU the installed engine cannot use
    (a llama-cpp-python built without CUDA, an onnxruntime without its CUDA provider) falls back to the CPU, and
    the model says why in `device_note`."""
    from runtimes.registry import open_runtime

    device = device or defaults.device
    options = LoadOptions(threads=threads or defaults.threads, context_length=context or defaults.context,
                          device=device, parallel=parallel or defaults.parallel or DEFAULT_PARALLEL)
    note = None
    try:
        runtime = open_runtime(defaults.model_path, options, defaults.engine)
    except EdgepackError as exc:
        if device == "cpu" or "unknown device" in str(exc):
            raise
        note = f"running on the CPU: {exc}"
        runtime = open_runtime(defaults.model_path, replace(options, device="cpu"), defaults.engine)
    given = chat_template or defaults.chat_template
    if given is not None:
        runtime.set_chat_template(given, "given")
    elif runtime.chat_template_text() is None:  # a base model: chat still works, in the documented default format
        runtime.set_chat_template(NAMED_CHAT_TEMPLATES[DEFAULT_CHAT_TEMPLATE], f"default ({DEFAULT_CHAT_TEMPLATE})")
    return (cls or ModelSession)(runtime, defaults.model_id, defaults, device_note=note)
