"""`edgepack distill`: teacher -> student, from checked inputs to a finished Hugging Face folder.

Every input is checked before anything is written or trained (teacher, student, vocabulary, data, prompts,
sequence length, the output folder, the teacher endpoint). Work in progress lives in `OUT/.work` (the layer-dropped
initialisation, checkpoints); the student's files, distill.json and report.md are put in OUT only at the end, so a
folder with a config.json is always a finished student.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from edgepack.core.errors import EdgepackError
from edgepack.core.fileio import fsync_tree
from edgepack.core.progress import progress_bar, say
from edgepack.core.versions import EDGEPACK_VERSION
from edgepack.distill.answer_targets import answer_training
from edgepack.distill.data import (
    BUILTIN_PROMPTS,
    TrainingSequence,
    files_digest,
    pack_documents,
    read_documents,
    read_prompts,
)
from edgepack.distill.evaluation import HeldOut, measure_student
from edgepack.distill.options import MODES, PRECISIONS, DistillOptions, DistillResult
from edgepack.distill.report import RECORD_FILE, plot_curve, write_record, write_report
from edgepack.distill.student_init import (
    check_same_vocabulary,
    copy_tokenizer_files,
    kept_layers,
    student_from_teacher,
)
from edgepack.distill.teacher_answers import (
    AnswerSettings,
    answers_cache_path,
    cached_answers,
    endpoint_answers,
    hf_answers,
)
from edgepack.distill.teacher_endpoint import Endpoint, check_teacher_url
from edgepack.distill.teacher_targets import (
    SparseTargets,
    cache_dir,
    load_targets,
    teacher_targets,
)
from edgepack.distill.train import TrainSettings, latest_checkpoint, total_steps, train
from edgepack.quality.behaviour import reference_answers
from edgepack.quality.evaluate import DEFAULT_WINDOW
from edgepack.quality.reference import (
    DEFAULT_EVAL_TEXT,
    DEFAULT_TOP_K,
    EvalWindows,
    make_windows,
    model_fingerprint,
    reference_for,
)
from edgepack.quality.tasks import builtin_tasks
from runtimes.base import LoadOptions
from runtimes.torch_reference import TorchRuntime

WORK_DIR = ".work"
INIT_DIR = "initial-student"


def distill(options: DistillOptions) -> DistillResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    _check_options(options)
    _require_extras(options)
    device = _device(options.device)
    precision = _precision(options.precision, device)
    out = Path(options.out)
    work = out / WORK_DIR
    _check_out(out, options)
    endpoint = None
    if options.teacher_url:
        endpoint = Endpoint(options.teacher_url, options.teacher_model or "", options.teacher_key_env)
        endpoint.check_reachable()
    teacher_path = Path(options.teacher) if options.teacher else None
    if teacher_path is not None and not TorchRuntime.can_load(teacher_path):
        raise EdgepackError(f"teacher {teacher_path} is not a Hugging Face model folder (config.json and "
                            "*.safetensors or pytorch_model.bin)")
    if options.student is not None and not TorchRuntime.can_load(options.student):
        raise EdgepackError(f"student {options.student} is not a Hugging Face model folder (config.json and "
                            "*.safetensors or pytorch_model.bin)")
    documents = read_documents(list(options.data)) if options.data else []
    prompts = read_prompts(options.prompts) if (options.mode != "logits" or not options.data) else []
    held_out_text = _held_out_text(options)

    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu",
                              gradient_accumulation_steps=options.grad_accum)
    set_seed(options.seed)
    if options.threads and device == "cpu":
        torch.set_num_threads(options.threads)
    teacher = TorchRuntime(teacher_path, LoadOptions(threads=options.threads,
                                                     device="cuda" if device == "cuda" else "cpu")) \
        if teacher_path is not None else None
    # the teacher's identity (sha256 of its weights): computed once, it keys every cache below
    teacher_fingerprint = model_fingerprint(teacher_path) if teacher_path is not None else None

    # the student's starting point (made once; a resumed run finds it in .work)
    if options.keep_layers is not None:
        start_dir = work / INIT_DIR
        kept = kept_layers(int(teacher.model.config.num_hidden_layers), options.keep_layers)
        with accelerator.main_process_first():  # every process enters: the barrier must be met by all
            if accelerator.is_main_process and not (start_dir / "config.json").is_file():
                say(f"making the student: the teacher's layers, keeping {options.keep_layers}")
                student_from_teacher(teacher_path, options.keep_layers, start_dir)
        initialisation = f"the teacher with layers dropped (--keep-layers {options.keep_layers})"
    else:
        start_dir, kept = Path(options.student), None
        initialisation = f"{start_dir.name} (an existing model)"
    from transformers import AutoConfig, AutoTokenizer

    student_tokenizer = AutoTokenizer.from_pretrained(start_dir)
    student_context = int(getattr(AutoConfig.from_pretrained(start_dir), "max_position_embeddings", 0) or 0)
    if student_context and options.seq_len > student_context:
        _discard_unstarted(work, options)
        raise EdgepackError(f"--seq-len {options.seq_len} is longer than the student's context ({student_context} "
                            "tokens); give at most that")
    token_level = options.mode in ("logits", "both")
    if token_level and teacher is not None:
        try:
            check_same_vocabulary(teacher.tokenizer, student_tokenizer, teacher_path.name, start_dir.name)
        except EdgepackError:
            _discard_unstarted(work, options)
            raise

    # what the student trains on
    sequences: list[TrainingSequence] = []
    if documents:
        sequences += pack_documents(student_tokenizer, documents, options.seq_len)
    answers_hit = None
    answer_targets: list[SparseTargets] | None = None
    soft_answers = 0
    if prompts:
        settings = AnswerSettings(options.samples, options.sample_temperature, options.max_answer_tokens, options.seed)
        identity = teacher_fingerprint if teacher is not None else f"{endpoint.shown_url}|{endpoint.model}"
        with progress_bar("teacher answers", len(prompts), options.show_progress and accelerator.is_main_process) \
                as advance, accelerator.main_process_first():
            answers, answers_hit = cached_answers(
                answers_cache_path(identity, prompts, settings),
                lambda: hf_answers(teacher, prompts, settings, on_prompt=lambda: advance(1)) if teacher is not None
                else endpoint_answers(endpoint, prompts, settings, on_prompt=lambda: advance(1)))
        from_answers = answer_training(student_tokenizer, prompts, answers, options.seq_len,
                                       use_logprobs=teacher is None)
        sequences += from_answers.sequences
        answer_targets, soft_answers = from_answers.targets, from_answers.with_soft_targets
    if not sequences:
        raise EdgepackError("nothing to train on: the data and prompts gave no sequence of at least 2 tokens")

    # the teacher's soft targets
    targets: list[SparseTargets] | None = None
    cache_hit = None
    if token_level and options.loss.alpha > 0:
        directory = cache_dir(teacher_fingerprint, sequences, options.top_k)
        with progress_bar("teacher logits", len(sequences), options.show_progress and accelerator.is_main_process) \
                as advance, accelerator.main_process_first():
            entry = teacher_targets(teacher.model, sequences, options.top_k, directory, options.batch_size,
                                    teacher.device, on_sequences=advance)
        targets, cache_hit = load_targets(entry.path), entry.hit
    elif answer_targets is not None and options.loss.alpha > 0 and not documents:
        targets = answer_targets

    # held-out text, read by the teacher through the quality stage's cache
    held_out = None
    if teacher is not None:
        with accelerator.main_process_first():  # the others read the teacher's figures from the cache
            held_out = _held_out(teacher, teacher_path, teacher_fingerprint, held_out_text, options, student_context,
                                 options.show_progress and accelerator.is_main_process)
    evaluate = (lambda model: asdict(measure_student(model, held_out, accelerator.device, with_answers=False))) \
        if held_out is not None else None

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(start_dir, dtype=torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    if teacher is not None and device == "cuda":
        teacher.model.to("cpu")  # the targets are on disk: free the GPU for training
    before = asdict(measure_student(model.to(accelerator.device), held_out, accelerator.device)) \
        if held_out is not None else {}
    if options.qlora:  # measured before in full precision; trained on a 4-bit copy
        from edgepack.distill.qlora import four_bit_linears, load_4bit_student

        del model
        model = load_4bit_student(start_dir, device, precision)
        base_weights = f"NF4 (bitsandbytes), {four_bit_linears(model)} linear layers"
    else:
        base_weights = "float32"
    steps = total_steps(len(sequences), options.batch_size, accelerator.num_processes, options.grad_accum,
                        options.max_steps, options.epochs)
    train_settings = TrainSettings(max_steps=steps, batch_size=options.batch_size, grad_accum=options.grad_accum,
                                   lr=options.lr, eval_every=options.eval_every, save_every=options.save_every,
                                   seed=options.seed, mixed_precision=precision,
                                   gradient_checkpointing=options.gradient_checkpointing,
                                   lora_rank=options.lora_rank, qlora=options.qlora)
    pad_id = student_tokenizer.pad_token_id if student_tokenizer.pad_token_id is not None else \
        (student_tokenizer.eos_token_id or 0)
    say(f"training {parameters:,} parameters for {steps} steps on {len(sequences)} sequences "
        f"({sum(s.scored_count for s in sequences):,} scored tokens), {device}, precision {precision}")
    model, state, full_state = train(model, sequences, targets, options.loss, train_settings, work, pad_id,
                                     accelerator, options.resume, evaluate, options.show_progress)
    if options.qlora:
        from edgepack.distill.qlora import merge_into_full_precision

        model, full_state = merge_into_full_precision(model, start_dir).to(accelerator.device), None
    elif options.lora_rank:
        model, full_state = model.merge_and_unload(), None
    after = asdict(measure_student(model, held_out, accelerator.device)) if held_out is not None else {}
    record = {
        "edgepack_version": EDGEPACK_VERSION,
        "teacher": {"kind": "huggingface" if teacher is not None else "endpoint",
                    "name": teacher_path.name if teacher_path else f"{endpoint.model} at {endpoint.shown_url}",
                    "fingerprint": teacher_fingerprint},
        "student": {"initialisation": initialisation, "parameters": parameters,
                    "kept_layers": kept if kept is not None else None},
        "data": {"files": [Path(p).name for p in options.data],
                 "sha256": files_digest(list(options.data)) if options.data else None,
                 "prompts": Path(options.prompts).name if options.prompts else
                 (BUILTIN_PROMPTS.name if prompts else None),
                 "prompts_count": len(prompts), "sequences": len(sequences),
                 "scored_tokens": sum(s.scored_count for s in sequences)},
        # answers whose tokens' log-probabilities (from the endpoint) were the student's soft targets
        "answers_with_soft_targets": soft_answers if targets is answer_targets else 0,
        "settings": {"mode": options.mode, "loss": options.loss.kind, "temperature": options.loss.temperature,
                     "alpha": options.loss.alpha, "jsd_beta": options.loss.jsd_beta, "top_k": options.top_k,
                     "seq_len": options.seq_len, "lr": options.lr, "batch_size": options.batch_size,
                     "grad_accum": options.grad_accum, "processes": accelerator.num_processes,
                     "lora_rank": options.lora_rank, "qlora": options.qlora, "base_weights": base_weights,
                     "precision": precision, "seed": options.seed,
                     "samples": options.samples, "sample_temperature": options.sample_temperature},
        "device": device,
        "steps": state.step, "train_seconds": round(state.seconds, 1), "tokens_trained": state.tokens,
        "resumed_at_steps": state.resumed_from,
        "teacher_cache_hit": cache_hit, "teacher_answers_cache_hit": answers_hit,
        "held_out": {"source": Path(options.eval_text).name if options.eval_text else "edgepack's built-in text",
                     "positions": held_out.positions if held_out else 0},
        "before": before, "after": after, "evaluations": state.evaluations,
        "losses": [[s, round(v, 5)] for s, v in state.losses],
    }
    if accelerator.is_main_process:
        _finish(out, work, model, full_state, student_tokenizer, start_dir, record, state, options.keep_checkpoints)
    accelerator.wait_for_everyone()
    return DistillResult(out=out, steps=state.step, seconds=state.seconds, tokens=state.tokens, before=before,
                         after=after, teacher_cache_hit=cache_hit, record=record,
                         main_process=accelerator.is_main_process)


def _check_options(options: DistillOptions) -> None:
    if options.mode not in MODES:
        raise EdgepackError(f"unknown --mode {options.mode!r}; accepted: {', '.join(MODES)}")
    if options.precision not in PRECISIONS:
        raise EdgepackError(f"unknown --precision {options.precision!r}; accepted: {', '.join(PRECISIONS)}")
    if (options.teacher is None) == (options.teacher_url is None):
        raise EdgepackError("give the teacher as --teacher FOLDER or as --teacher-url URL --teacher-model NAME "
                            "(one of the two)")
    if options.teacher_url is not None:
        check_teacher_url(options.teacher_url, options.allow_insecure_teacher)
        if not options.teacher_model:
            raise EdgepackError("--teacher-url needs --teacher-model (the model name the endpoint serves)")
        if options.mode != "sequence":
            raise EdgepackError(f"--mode {options.mode} needs the teacher's logits at every position, which an "
                                "endpoint does not give: use --mode sequence with --teacher-url, or a teacher "
                                "folder")
    if (options.student is None) == (options.keep_layers is None):
        raise EdgepackError("give the student as --student FOLDER or make it from the teacher with --from-teacher "
                            "--keep-layers N|SHARE (one of the two)")
    if options.keep_layers is not None and options.teacher is None:
        raise EdgepackError("--from-teacher needs the teacher's weights: give --teacher FOLDER")
    if options.mode == "sequence" and options.data:
        raise EdgepackError("--mode sequence trains on the teacher's answers to --prompts; --data is for --mode "
                            "logits or both")
    for name in ("seq_len", "batch_size", "grad_accum", "eval_every", "save_every", "top_k", "samples",
                 "eval_windows", "max_answer_tokens"):
        if getattr(options, name) < 1:
            raise EdgepackError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(options, name)}")
    if options.max_steps is not None and options.max_steps < 1:
        raise EdgepackError(f"--max-steps must be at least 1, got {options.max_steps}")
    if options.epochs is not None and options.epochs <= 0:
        raise EdgepackError(f"--epochs must be above 0, got {options.epochs}")
    if options.max_steps is not None and options.epochs is not None:
        raise EdgepackError("give --max-steps or --epochs, not both")
    if options.lora_rank is not None and options.lora_rank < 1:
        raise EdgepackError(f"--lora must be a rank of at least 1, got {options.lora_rank}")
    if options.qlora and not options.lora_rank:
        raise EdgepackError("--qlora trains low-rank adapters on a 4-bit base: give their rank with --lora R too")


def _require_extras(options: DistillOptions) -> None:
    """The optional packages this run needs (pip install 'edgepack[distill]'), checked before any work."""
    import importlib.util

    needed = ["datasets" if options.data else None, "peft" if options.lora_rank else None]
    missing = [name for name in needed if name and importlib.util.find_spec(name) is None]
    if missing:
        raise EdgepackError(f"edgepack distill needs {', '.join(missing)} for this run: "
                            "pip install 'edgepack[distill]'")
    if options.qlora and importlib.util.find_spec("bitsandbytes") is None:
        raise EdgepackError("--qlora needs bitsandbytes (its 4-bit weights): pip install 'edgepack[qlora]'")


def _device(asked: str) -> str:
    if asked == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if asked == "cuda" and not torch.cuda.is_available():
        raise EdgepackError("--device cuda asked for, but torch sees no CUDA GPU")
    if asked not in ("cpu", "cuda"):
        raise EdgepackError(f"unknown --device {asked!r}; accepted: auto, cpu, cuda")
    return asked


def _precision(asked: str, device: str) -> str:
    if asked == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if asked == "fp16" and device != "cuda":
        raise EdgepackError("--precision fp16 needs a CUDA device; on the CPU use bf16 (fast where the CPU has "
                            "AMX or AVX512-BF16) or no")
    return asked


def _check_out(out: Path, options: DistillOptions) -> None:
    if (out / "config.json").is_file() and not options.force:
        raise EdgepackError(f"{out} already holds a model; give another --out, or --force to replace it")
    work = out / WORK_DIR
    if options.resume:
        return  # a resumed run with no checkpoint yet starts from the beginning
    if latest_checkpoint(work) is not None:
        raise EdgepackError(f"{out} holds an unfinished distillation; give --resume to continue it, or another "
                            "--out")
    if out.exists() and any(p.name != WORK_DIR for p in out.iterdir()) and not options.force:
        raise EdgepackError(f"{out} is not empty; give an empty or new folder as --out")


def _discard_unstarted(work: Path, options: DistillOptions) -> None:
    """A run refused before training leaves nothing behind (a resumed run keeps its work)."""
    if not options.resume and work.exists():
        shutil.rmtree(work, ignore_errors=True)
        if not any(work.parent.iterdir()):
            work.parent.rmdir()


def _held_out_text(options: DistillOptions) -> str:
    path = Path(options.eval_text) if options.eval_text else DEFAULT_EVAL_TEXT
    if not path.is_file():
        raise EdgepackError(f"held-out text {path} does not exist")
    text = path.read_text(encoding="utf-8")
    for data in options.data:
        if Path(data).is_file() and hashlib.sha256(Path(data).read_bytes()).digest() == \
                hashlib.sha256(text.encode("utf-8")).digest():
            raise EdgepackError(f"{data} is also the held-out evaluation text; the student must be measured on "
                                "text it was not trained on (give another --eval-text)")
    return text


def _held_out(teacher: TorchRuntime, teacher_path: Path, teacher_fingerprint: str, text: str, options: DistillOptions,
              student_context: int, show_progress: bool) -> HeldOut:
    window = min(DEFAULT_WINDOW, teacher.context_length, student_context or DEFAULT_WINDOW)
    windows = make_windows(teacher, text, window)
    with progress_bar("teacher on held-out text", len(windows.windows), show_progress) as advance:
        reference = reference_for(teacher, teacher_path, text, windows, window, DEFAULT_TOP_K,
                                  on_window=lambda: advance(1))
    count = min(options.eval_windows, len(windows.windows))
    answers = ()
    if options.behaviour and teacher.has_chat_template():
        tasks = builtin_tasks()
        with progress_bar("teacher answers to the behaviour prompts", len(tasks), show_progress) as advance:
            answers = reference_answers(teacher, teacher_fingerprint, tasks, window, DEFAULT_TOP_K,
                                        on_prompt=lambda: advance(1)).answers
    return HeldOut(EvalWindows(windows.windows[:count]), tuple(reference[:count]), tuple(answers))


def _finish(out: Path, work: Path, model, full_state: dict | None, tokenizer, start_dir: Path, record: dict, state,
            keep_checkpoints: bool) -> None:
    """The student's files go to OUT/.work/final first and are moved into OUT together, the record last."""
    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir(parents=True)
    model.save_pretrained(final, safe_serialization=True, **({"state_dict": full_state} if full_state else {}))
    tokenizer.save_pretrained(final)
    copy_tokenizer_files(start_dir, final)
    curve = plot_curve(final, state.losses, state.evaluations)
    write_report(final, record, curve)
    write_record(final, record)
    for path in final.iterdir():
        path.chmod(0o644)  # safetensors writes its file 0600; a student is read by other users and services
    fsync_tree(final)
    names = sorted(p.name for p in final.iterdir())
    for name in [n for n in names if n != RECORD_FILE] + [RECORD_FILE]:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        (final / name).replace(target)
    if not keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
