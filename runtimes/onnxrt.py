"""ONNX Runtime over our ONNX variants (a directory with model.onnx, config.json and the tokenizer).

Our own decode loop on an InferenceSession, not optimum's generate: inputs are bound from preallocated buffers
(attention mask and positions are slices of arrays sized for the whole context) and the next-token logits land in
one reused buffer. The KV cache depends on the graph:
- our decode-optimized graph (converters/onnx/decoder_graph.py): one buffer per layer and part, sized for the
  whole context, bound as both past and present, so GroupQueryAttention writes each new position in place;
- optimum's export: the present KV comes back as new OrtValues each step and is bound as the next step's past.
On our graph, generations go through the batch scheduler (runtimes/onnx_batch.py), several at once; optimum's
export generates one at a time with the loop in runtimes/base.py. Output grammars (response_format, forced tool
calls) use llama.cpp's grammar sampler over the folder's tokenizer.gguf.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edgepack.core.errors import EdgepackError
from edgepack.core.onnx_folder import GRAMMAR_VOCAB_FILE, GRAPH_KIND, GRAPH_METADATA_KEY, MODEL_FILE, is_onnx_folder
from runtimes.base import DEFAULT_CONTEXT_CAP, GenerationChunk, GenerationOptions, LoadOptions, Runtime, physical_cores
from runtimes.batching import common_prefix
from runtimes.hf_text import HFTokenizerText, end_of_generation_ids

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    options.log_severity_level = 3
    # smaller work blocks for the many tiny ops of a batch-1 decode step (measured ~5% faster per step here)
    options.add_session_config_entry("session.dynamic_block_base", "4")
    return options


# glibc's mallopt(M_MMAP_THRESHOLD, 1 MiB): blocks of 1 MiB and more are mapped and unmapped on their own
M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES = -3, 1 << 20


def _return_large_blocks_to_the_system() -> None:
    """Loading a model, ONNX Runtime parses the whole protobuf and frees it. glibc's default threshold for mapping a
    block on its own rises with such frees, and blocks then left in per-thread heaps were not returned: in identical
    runs, onnx-fp32 of the demo peaked at 879 or at 1,178 MiB. A fixed threshold returns every large block (850 MiB
    in every run), so memory is the same each time. Linux with glibc only; elsewhere nothing changes."""
    import ctypes
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)
        except (OSError, AttributeError):
            pass


def open_session(model_file: Path, threads: int, device: str = "cpu"):
    import onnxruntime as ort

    _return_large_blocks_to_the_system()

    if device not in _PROVIDERS:
        raise EdgepackError(f"unknown device {device!r} for ONNX Runtime; accepted: {', '.join(_PROVIDERS)}")
    provider = _PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise EdgepackError(f"device {device!r}: this onnxruntime has no {provider} (install onnxruntime-gpu)")
    if not model_file.is_file():
        raise EdgepackError(f"{model_file} does not exist; an ONNX variant is a directory with {MODEL_FILE}")
    try:
        return ort.InferenceSession(str(model_file), sess_options=session_options(threads), providers=[provider])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph types
        raise EdgepackError(f"ONNX Runtime could not load {model_file}: the file is truncated, corrupt or not a "
                            f"model ({type(exc).__name__}: {str(exc)[:300]})") from exc


class OnnxRuntime(HFTokenizerText, Runtime):
    name = "onnxrt"
    prefill_chunk = 256  # tokens per forward pass while reading a prompt

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return is_onnx_folder(path)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        import onnxruntime as ort

        return device in _PROVIDERS and _PROVIDERS[device] in ort.get_available_providers()

    def __init__(self, path: Path, options: LoadOptions | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        options = options or LoadOptions()
        self.path = Path(path)
        self.threads = options.threads or physical_cores()
        self.device = options.device
        if options.parallel < 1:
            raise EdgepackError(f"parallel sequences {options.parallel}: must be 1 or more")
        self.parallel = options.parallel
        self.session = open_session(self.path / MODEL_FILE, self.threads, options.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        config = AutoConfig.from_pretrained(self.path)
        trained = int(getattr(config, "max_position_embeddings", DEFAULT_CONTEXT_CAP))
        self.context_length = options.context_length or min(trained, DEFAULT_CONTEXT_CAP)
        try:
            generation = GenerationConfig.from_pretrained(self.path)
        except OSError:
            generation = None
        self.eos_token_ids = end_of_generation_ids(generation, config, self.tokenizer)
        # output grammars are llama.cpp's grammar sampler over the tokenizer as llama.cpp reads it, which the
        # converter writes beside the model
        if not (self.path / GRAMMAR_VOCAB_FILE).is_file():
            self.unconstrained_remedy = (f"this ONNX variant has no {GRAMMAR_VOCAB_FILE} (made before edgepack wrote "
                                         "one, or for a tokenizer llama.cpp does not read): convert it again, or "
                                         "serve a GGUF variant")
        elif importlib.util.find_spec("llama_cpp") is None:
            self.unconstrained_remedy = "install llama-cpp-python, whose grammar sampler the ONNX engine uses"
        else:
            self.constrains_output = True
        self._grammar_vocab = None
        self._grammar_vocab_lock = threading.Lock()

        inputs = {i.name: i for i in self.session.get_inputs()}
        self._past_names = sorted((name for name in inputs if _PAST.fullmatch(name)),
                                  key=lambda n: (int(_PAST.fullmatch(n).group(1)), n))
        if "input_ids" not in inputs or not self._past_names:
            raise EdgepackError(f"{self.path / MODEL_FILE} is not a text-generation-with-past export "
                                "(needs input_ids and past_key_values.N.key/value inputs)")
        self._present_names = [name.replace("past_key_values", "present") for name in self._past_names]
        first = inputs[self._past_names[0]]
        self._kv_heads, self._head_dim = int(first.shape[1]), int(first.shape[3])
        self._kv_dtype = _NUMPY_TYPES.get(first.type, np.float32)
        self._has_positions = "position_ids" in inputs
        self._has_mask = "attention_mask" in inputs
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.shares_kv_buffer = metadata.get(GRAPH_METADATA_KEY) == GRAPH_KIND
        # our graph generates through the batch scheduler (runtimes.onnx_batch); optimum's export one at a time
        self.generates_concurrently = self.shares_kv_buffer
        self._scheduler = None
        self._scheduler_lock = threading.Lock()
        self._vocab = int(self.session.get_outputs()[0].shape[-1]) if isinstance(
            self.session.get_outputs()[0].shape[-1], int) else len(self.tokenizer)
        # preallocated once, sliced per step
        self._mask = np.ones((1, self.context_length), dtype=np.int64)
        self._positions = np.arange(self.context_length, dtype=np.int64)[None, :]
        self._empty_past = np.zeros((1, self._kv_heads, 0, self._head_dim), dtype=self._kv_dtype)
        self._step_ids = np.zeros((1, 1), dtype=np.int64)
        self._step_logits = np.zeros((1, 1, self._vocab), dtype=np.float32)
        self._present: list = []
        self._past_length = 0
        self._kept: list[int] = []  # the tokens whose KV the single-sequence buffers hold after a logits call
        if self.shares_kv_buffer:
            # zeros from calloc: pages become resident only as positions are written
            self._kv_buffers = [np.zeros((1, self._kv_heads, self.context_length, self._head_dim), self._kv_dtype)
                                for _ in self._past_names]
            self._kv_values = [self._ortvalue(buffer) for buffer in self._kv_buffers]
            # one binding for the session's life: the KV buffers stay bound; each step rebinds ids, mask, logits
            self._kv_binding = self.session.io_binding()
            self._kv_binding.bind_output("logits", "cpu")  # first, so it stays output 0 when rebound
            for past, present, value in zip(self._past_names, self._present_names, self._kv_values, strict=True):
                self._kv_binding.bind_ortvalue_input(past, value)
                self._kv_binding.bind_ortvalue_output(present, value)

    def _ortvalue(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(array)

    # -- computing ------------------------------------------------------------------------------

    def _run(self, input_ids: np.ndarray, past_length: int, logits_buffer: np.ndarray | None):
        """One forward pass continuing from `past_length` cached positions; returns the logits OrtValue or
        writes them into `logits_buffer`."""
        count = input_ids.shape[1]
        binding = self._kv_binding if self.shares_kv_buffer else self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        if self._has_mask:
            binding.bind_cpu_input("attention_mask", self._mask[:, : past_length + count])
        if self._has_positions:
            binding.bind_cpu_input("position_ids", self._positions[:, past_length: past_length + count])
        if logits_buffer is not None:
            binding.bind_output("logits", "cpu", element_type=np.float32, shape=logits_buffer.shape,
                                buffer_ptr=logits_buffer.ctypes.data)
        else:
            binding.bind_output("logits", "cpu")
        if not self.shares_kv_buffer:
            for index, name in enumerate(self._past_names):
                if past_length == 0:
                    binding.bind_cpu_input(name, self._empty_past)
                else:
                    binding.bind_ortvalue_input(name, self._present[index])
            for name in self._present_names:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        self._past_length = past_length + count
        if self.shares_kv_buffer:
            return None if logits_buffer is not None else binding.get_outputs()[0]
        outputs = binding.get_outputs()
        self._present = outputs[1:]
        return outputs[0]

    def _prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """The prompt in chunks of `prefill_chunk` tokens, so a long prompt allocates chunk x vocab logits, not
        prompt x vocab (4,096 tokens of a 49,152-token vocabulary would be 805 MB); only the last is kept."""
        ids = np.asarray([list(prompt_ids)], dtype=np.int64)
        past = 0
        self._kept = []  # the buffers now hold this session's tokens
        for start in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, start:start + self.prefill_chunk]
            logits = self._run(chunk, past, None)
            past += chunk.shape[1]
        return logits.numpy()[0, -1].astype(np.float32)

    def _step(self, token_id: int) -> np.ndarray:
        self._step_ids[0, 0] = token_id
        self._run(self._step_ids, self._past_length, self._step_logits)
        return self._step_logits[0, 0]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.logits_from(token_ids, 0)

    def logits_from(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        """On our graph, the KV of the prefix this call shares with the previous logits call (up to `start`) is kept
        and only the rest is computed (the behaviour prompts share the chat template's system prompt)."""
        self.check_prompt_fits(token_ids, 0)
        token_ids = list(token_ids)
        shared = 0
        if self.shares_kv_buffer:
            shared = min(common_prefix(self._kept, token_ids), start)
        ids = np.asarray([token_ids[shared:]], dtype=np.int64)
        logits = self._run(ids, shared, None).numpy()[0, start - shared:].astype(np.float32)
        self._present, self._past_length = [], 0
        self._kept = token_ids if self.shares_kv_buffer else []
        return logits

    def scheduler(self):
        """The batch scheduler over `parallel` rows of KV buffers, started on first use."""
        from runtimes.onnx_batch import OnnxBatchScheduler

        with self._scheduler_lock:  # two first callers at once would start two schedulers
            if self._scheduler is None:
                self._scheduler = OnnxBatchScheduler(self, self.parallel)
            return self._scheduler

    def generate(self, prompt: str | Sequence[int], options: GenerationOptions | None = None,
                 cancel: threading.Event | None = None) -> Iterator[GenerationChunk]:
        if not self.generates_concurrently:
            yield from super().generate(prompt, options, cancel)
            return
        options = options or GenerationOptions()
        prompt_ids = list(self.tokenize(prompt) if isinstance(prompt, str) else prompt)
        self.check_prompt_fits(prompt_ids, 1)
        yield from self.scheduler().stream(prompt_ids, options, cancel)

    def output_grammar(self, grammar: str | None):
        if grammar is None or not self.constrains_output:
            return super().output_grammar(grammar)
        # llama-cpp-python is optional here (an ONNX bundle's wheelhouse leaves it out): imported only for grammars
        import llama_cpp

        from runtimes.llamacpp_amx import load_llama
        from runtimes.llamacpp_sampling import OutputGrammar

        with self._grammar_vocab_lock:  # requests check their grammars on worker threads (check_output_grammar)
            if self._grammar_vocab is None:
                self._grammar_vocab = load_llama(self.path / GRAMMAR_VOCAB_FILE, vocab_only=True, verbose=False)
        return OutputGrammar(llama_cpp.llama_model_get_vocab(self._grammar_vocab.model), grammar)

    def memory_bytes(self) -> int:
        weights = sum(f.stat().st_size for f in self.path.iterdir() if f.name.startswith("model.onnx"))
        kv_cache = len(self._past_names) * self._kv_heads * self._head_dim * self.context_length * \
            np.dtype(self._kv_dtype).itemsize * (self.parallel if self.generates_concurrently else 1)
        prefill_logits = min(self.prefill_chunk, self.context_length) * self._vocab * 4
        return weights + kv_cache + prefill_logits

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None
        self._present = []
        self._kv_values, self._kv_buffers, self._kv_binding = [], [], None
        self.session = None
        if self._grammar_vocab is not None:
            self._grammar_vocab.close()
            self._grammar_vocab = None
