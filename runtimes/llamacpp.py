"""llama.cpp through llama-cpp-python: a GGUF file as a Runtime (and the small helpers the parity checks use)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edgepack.core.errors import EdgepackError
from runtimes.base import (
    DEFAULT_CONTEXT_CAP,
    GenerationChunk,
    GenerationOptions,
    LoadOptions,
    Runtime,
    physical_cores,
)
from runtimes.llamacpp_amx import load_llama
from runtimes.native_stderr import quiet_native_stderr


def is_gguf(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


_context_params_lock = threading.Lock()


@contextlib.contextmanager
def _sequences_in_context(sequences: int) -> Iterator[None]:
    """llama_cpp.Llama takes its context parameters from llama_context_default_params() and has no argument for
    the number of sequences, so the default is changed for the duration of one load. Each sequence gets a KV cache
    of its own (`n_ctx / n_seq_max` cells): in one unified cache, every sequence's attention would read every
    cached cell, and a follow-up kept for later would slow everyone's decoding (measured: 71 -> 31 t/s with three
    idle 1,500-token sequences cached, 78 -> 82 t/s with separate caches)."""
    import llama_cpp.llama_cpp as native

    if sequences == 1:
        yield
        return
    original = native.llama_context_default_params

    def with_sequences():
        params = original()
        params.n_seq_max = sequences
        params.kv_unified = False
        return params

    with _context_params_lock:
        native.llama_context_default_params = with_sequences
        try:
            yield
        finally:
            native.llama_context_default_params = original


def open_gguf(path: Path, *, vocab_only: bool = False, n_ctx: int = 512, n_threads: int | None = None,
              n_gpu_layers: int = 0, sequences: int = 1):
    """A llama_cpp.Llama over `path`, or a clear error when the file is not a loadable GGUF. With `sequences` > 1
    the context holds that many sequences of up to `n_ctx` tokens each."""
    path = Path(path)
    if not path.is_file():
        raise EdgepackError(f"{path} does not exist; expected a .gguf file")
    if not is_gguf(path):
        raise EdgepackError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    threads = n_threads or physical_cores()
    try:
        with quiet_native_stderr(), _sequences_in_context(sequences):
            return load_llama(path, vocab_only=vocab_only, n_ctx=n_ctx * sequences, n_threads=threads,
                              n_threads_batch=threads, n_batch=min(max(n_ctx, 8), 512), n_gpu_layers=n_gpu_layers,
                              verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise EdgepackError(f"llama.cpp could not load {path}: the file is truncated, corrupt or of an "
                            f"unsupported architecture ({exc})") from exc


def tokenize(llm, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)


class LlamaCppRuntime(Runtime):
    name = "llamacpp"
    generates_concurrently = True  # through the batch scheduler
    constrains_output = True  # llama.cpp's grammar sampler

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return is_gguf(Path(path))

    @classmethod
    def supports_device(cls, device: str) -> bool:
        import llama_cpp

        return device == "cpu" or (device in ("cuda", "metal") and bool(llama_cpp.llama_supports_gpu_offload()))

    def __init__(self, path: Path, options: LoadOptions | None = None) -> None:
        import llama_cpp

        from edgepack.core.gguf_file import metadata_value, open_reader

        options = options or LoadOptions()
        self.path = Path(path)
        reader = open_reader(self.path)
        arch = str(metadata_value(reader, "general.architecture", ""))
        trained = int(metadata_value(reader, f"{arch}.context_length", 2048))
        self.context_length = options.context_length or min(trained, DEFAULT_CONTEXT_CAP)
        heads = int(metadata_value(reader, f"{arch}.attention.head_count", 1))
        self._kv_width = int(metadata_value(reader, f"{arch}.attention.key_length", 0)) or (
            int(metadata_value(reader, f"{arch}.embedding_length", 0)) // heads)
        del reader
        gpu_layers = 0
        if options.device in ("cuda", "metal"):
            if not llama_cpp.llama_supports_gpu_offload():
                raise EdgepackError(f"device {options.device!r}: this llama-cpp-python build has no GPU offload; "
                                    "reinstall it built for your GPU (e.g. CMAKE_ARGS=-DGGML_CUDA=on) or use cpu")
            gpu_layers = -1
        elif options.device != "cpu":
            raise EdgepackError(f"unknown device {options.device!r}; accepted: cpu, cuda, metal")
        self.device = options.device
        self.threads = options.threads or physical_cores()
        if options.parallel < 1:
            raise EdgepackError(f"parallel sequences {options.parallel}: must be 1 or more")
        self.parallel = options.parallel
        self.llm = open_gguf(self.path, n_ctx=self.context_length, n_threads=self.threads, n_gpu_layers=gpu_layers,
                             sequences=self.parallel)
        self._ctx, self._model = self.llm.ctx, self.llm.model
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._n_batch = self.llm.n_batch
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._n_past = 0
        self._kept: list[int] = []  # the tokens in the KV cache after a logits call (a prefix the next can reuse)
        self._memory_user = "direct"  # "direct" (logits) or "batch" (the scheduler's sequences)
        self._scheduler = None
        self._scheduler_lock = threading.Lock()
        self.eos_token_ids = frozenset(t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t))
        template = llama_cpp.llama_model_chat_template(self._model, None)
        self._chat_template = template.decode("utf-8") if template else None
        self._specials: dict[int, str] | None = None

    # -- text ------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return tokenize(self.llm, text, add_special=add_special, parse_special=parse_special)

    def special_tokens(self) -> dict[int, str]:
        import llama_cpp

        if self._specials is None:  # read once: it walks the whole vocabulary
            self._specials = {
                token: self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")
                for token in range(self._n_vocab)
                if llama_cpp.llama_vocab_get_attr(self._vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL}
        return self._specials

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(token_ids)).decode("utf-8", errors="replace")

    def chat_template_text(self) -> str | None:
        return self._chat_template

    def set_chat_template(self, template: str, source: str) -> None:
        self._chat_template, self.chat_template_source = template, source

    def token_bytes(self, token_id: int) -> bytes:
        return self.llm.detokenize([token_id])

    def vocab_size(self) -> int:
        return self._n_vocab

    def output_grammar(self, grammar: str | None):
        from runtimes.llamacpp_sampling import OutputGrammar

        return None if grammar is None else OutputGrammar(self._vocab, grammar)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not self._chat_template:
            raise EdgepackError(f"{self.path.name} has no chat template (tokenizer.chat_template); "
                                "use a plain prompt instead of chat")
        def text_of(token: int) -> str:
            return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

        formatter = Jinja2ChatFormatter(self._chat_template, eos_token=text_of(self.llm.token_eos()),
                                        bos_token=text_of(self.llm.token_bos()),
                                        add_generation_prompt=add_generation_prompt)
        return formatter(messages=messages, tools=tools).prompt

    # -- computing ------------------------------------------------------------------------------

    def _decode(self, token_ids: Sequence[int], logits_from: int) -> Iterator[np.ndarray]:
        """Append `token_ids` to sequence 0; yields the logits of the positions from `logits_from` on (absolute
        positions) chunk by chunk."""
        import llama_cpp

        batch = self._batch
        for start in range(0, len(token_ids), self._n_batch):
            chunk = token_ids[start:start + self._n_batch]
            batch.n_tokens = len(chunk)
            wanted = 0
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = self._n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = self._n_past + i >= logits_from
                wanted += batch.logits[i]
            if llama_cpp.llama_decode(self._ctx, batch) != 0:
                raise EdgepackError(f"llama.cpp failed to decode {len(chunk)} tokens at position {self._n_past}")
            self._n_past += len(chunk)
            if wanted:
                yield np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx),
                                            shape=(wanted, self._n_vocab)).copy()

    def _reset(self) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._n_past = 0
        self._kept = []

    def _claim_memory(self, user: str) -> bool:
        """The KV cache is used either directly (one sequence) or by the batch scheduler; switching clears it and
        what either side remembers of it. Whether it was cleared."""
        import llama_cpp

        if user == self._memory_user:
            return False
        if self._scheduler is not None and user == "direct":
            self._scheduler.forget_cache()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._n_past, self._kept, self._memory_user = 0, [], user
        return True

    # -- generating: every generation goes through the batch scheduler (llama.cpp samples in C) ----

    def scheduler(self):
        """The batch scheduler over this context's sequences, started on first use."""
        from runtimes.llamacpp_batch import BatchScheduler

        with self._scheduler_lock:  # two first callers at once would start two schedulers on one context
            if self._scheduler is None:
                self._scheduler = BatchScheduler(self, self.parallel)
            return self._scheduler

    def generate(self, prompt: str | Sequence[int], options: GenerationOptions | None = None,
                 cancel: threading.Event | None = None) -> Iterator[GenerationChunk]:
        options = options or GenerationOptions()
        prompt_ids = list(self.tokenize(prompt) if isinstance(prompt, str) else prompt)
        self.check_prompt_fits(prompt_ids, 1)
        yield from self.scheduler().stream(prompt_ids, options, cancel)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.logits_from(token_ids, 0)

    def logits_from(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Only the rows from `start` are computed, and the KV cache of the prefix this call shares with the previous
        logits call is kept (up to `start`: rows asked for are always computed anew)."""
        import llama_cpp

        self.check_prompt_fits(token_ids, 0)
        token_ids = list(token_ids)
        shared = 0
        for kept, token in zip(self._kept, token_ids[:start], strict=False):
            if kept != token:
                break
            shared += 1
        self._claim_memory("direct")
        if shared and llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), 0, shared, -1):
            self._n_past = shared
        else:
            self._reset()
            shared = 0
        rows = np.concatenate(list(self._decode(token_ids[shared:], logits_from=start)), axis=0)
        self._kept = token_ids
        return rows

    def memory_bytes(self) -> int:
        import llama_cpp

        weights = int(llama_cpp.llama_model_size(self._model))
        layers = int(llama_cpp.llama_model_n_layer(self._model))
        kv_heads = int(llama_cpp.llama_model_n_head_kv(self._model))
        kv_cache = 2 * layers * kv_heads * self._kv_width * self.context_length * self.parallel * 2  # K and V, f16
        return weights + kv_cache

    def close(self) -> None:
        import llama_cpp

        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self.llm.close()

