"""Everything up to `trainer.train()`: data, model, SFTConfig, callbacks; and the context it trains in."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from peft.helpers import disable_input_dtype_casting
from transformers import EarlyStoppingCallback, PrinterCallback, TrainerCallback, set_seed
from transformers.trainer_pt_utils import get_length_grouped_indices
from trl import SFTTrainer

from datasets import Dataset, disable_progress_bars
from tuner import memory, replycache
from tuner.config import Method, Quantization, TrainConfig
from tuner.errors import DataError
from tuner.models import gpu_memory, load_model, load_tokenizer, resolve_model
from tuner.runs import (
    Run,
    check_data,
    checkpoint_step,
    complete_checkpoints,
    is_main_process,
    remove_incomplete_checkpoints,
    truncate_metrics,
    update_status,
    world_size,
)
from tuner.train.callbacks import OverheadBudget, RunRecorder
from tuner.train.checkpoints import offset_from
from tuner.train.data import eval_sample, load_split
from tuner.train.recipe import (
    attention,
    gradient_checkpointing,
    lora_config,
    packing_mode,
    precision,
    precision_reason,
    quantization,
    sft_config,
)
from tuner.train.voicecheck import CHECK_PROMPTS, METRIC, VoiceCheck, habit_of, held_out_prompts, reply_budget


def length_grouped_batches(lengths: list[int], batch_size: int, generator=None) -> list[int]:
    """Indices whose consecutive `batch_size` slices hold examples of similar length, batches in random order.

    transformers' LengthGroupedSampler sorts within mega-batches of at most 50 batches, but shrinks them
    so that an epoch has at least 4: on a few hundred examples a mega-batch is 1 to 6 batches and most
    of a step is padding (measured 56% fill on the benchmark's 23 examples). Here the mega-batches are
    always 50 batches (the library's own grouping function), and randomness comes from shuffling the
    order of the batches instead; the batch with the longest example stays first, so a batch that
    does not fit in memory fails at step 1, and a short last batch stays last.
    """
    order = get_length_grouped_indices(lengths, batch_size, mega_batch_mult=50, generator=generator)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches.sort(key=lambda b: -max(lengths[i] for i in b))  # longest first, then the others shuffled
    first, rest = batches[:1], batches[1:]
    tail = [b for b in rest if len(b) < batch_size]
    rest = [b for b in rest if len(b) == batch_size]
    shuffled = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    return [i for b in first + shuffled + tail for i in b]


class GroupedSampler(torch.utils.data.Sampler):
    def __init__(self, lengths: list[int], batch_size: int):
        self.lengths, self.batch_size = lengths, batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(length_grouped_batches(self.lengths, self.batch_size))

class TunerSFTTrainer(SFTTrainer):
    """trl's SFTTrainer with tighter length grouping (see length_grouped_batches), and the evaluation before
    training taken from an earlier run when it would measure the same thing (see evaluate)."""

    base_eval_key: str | None = None  # build_trainer sets it (base_eval_key) where the cache may answer
    run_dir: Path | None = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """The evaluation before training scores the base model (a new LoRA adapter adds nothing to it), which
        does not change between runs: an earlier run of the same base, validation sample, precision and settings
        measured it, so its figures are logged and passed to the callbacks as they were (1.9 s of a 36 s
        run on a 2-core Xeon, measured), and the status says where they came from. Any other evaluation runs."""
        key = self.base_eval_key if (self.state.global_step == 0 and eval_dataset is None
                                     and metric_key_prefix == "eval") else None
        cached = replycache.read_entry(key, BASE_EVAL_KIND) if key else None
        if cached and isinstance(cached.get("metrics"), dict) and "eval_loss" in cached["metrics"]:
            started = time.monotonic()
            for _ in self.get_eval_dataloader():  # its sampler and loader draw from the global RNG as the evaluation's
                pass  # would: the training batches that follow are the same
            metrics = {**cached["metrics"], "eval_runtime": round(time.monotonic() - started, 4)}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            if self.run_dir is not None:
                update_status(self.run_dir, base_eval={"source": "cached", "seconds_saved": cached.get("seconds")})
            return metrics
        started = time.monotonic()
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if key:
            seconds = round(time.monotonic() - started, 2)
            kept = {k: v for k, v in metrics.items() if k.startswith("eval_") and k not in BASE_EVAL_TRANSIENT}
            replycache.write(key, {"metrics": kept, "seconds": seconds}, BASE_EVAL_KIND)
            if self.run_dir is not None:
                update_status(self.run_dir, base_eval={"source": "evaluated", "seconds": seconds})
        return metrics

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if (self.args.train_sampling_strategy != "group_by_length" or self.args.world_size > 1
                or dataset is None or "input_ids" not in dataset.column_names):
            return super()._get_train_sampler(train_dataset)
        lengths = [len(ids) for ids in dataset["input_ids"]]
        return GroupedSampler(lengths, self.args.train_batch_size)  # each forward's batch is what pads


BASE_EVAL_KIND = "base_eval"
# figures of an evaluation that are not the base's: its clock, and what callbacks add after it (the voice score)
BASE_EVAL_TRANSIENT = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", f"eval_{METRIC}"}


def base_eval_key(cfg: TrainConfig, dev: str, prec: dict[str, Any], quant: str, attn: str, eval_dataset,
                  eval_batch: int) -> str | None:
    """A key for the base's evaluation before training, naming all it depends on: the base's weights
    (tuner.replycache's fingerprint), the validation sample exactly as tokenized, the precision, quantization,
    attention, device, evaluation batch and the library versions. None where the cache must not answer: a
    Hub id (nothing local to fingerprint), several processes (each must evaluate, or they wait on each other)."""
    import bitsandbytes
    import peft
    import transformers
    import trl

    from tuner import __version__

    location = resolve_model(cfg.base_model)
    if eval_dataset is None or not Path(location).is_dir() or world_size() > 1:
        return None
    data = hashlib.sha256(json.dumps(eval_dataset.to_dict(), sort_keys=True).encode())  # every column trl feeds
    parts = {"model": replycache.weights_fingerprint(location), "data": data.hexdigest(), "precision": prec["name"],
             "quantization": quant, "attention": attn, "device": dev, "batch": eval_batch,
             "assistant_only_loss": cfg.assistant_only_loss, "method": cfg.method.value, "tuner": __version__,
             "versions": [torch.__version__, transformers.__version__, trl.__version__, peft.__version__,
                          bitsandbytes.__version__]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _load_data(run_dir: Path, cfg: TrainConfig, tokenizer):
    """Both splits as the trainer sees them; what was dropped and why goes into the status."""
    train_rows, train_stats = load_split(run_dir, "train.jsonl", tokenizer, cfg.assistant_only_loss, cfg.max_length)
    val_rows, val_stats = load_split(run_dir, "validation.jsonl", tokenizer, cfg.assistant_only_loss, cfg.max_length)
    warnings = []
    if not val_rows:
        warnings.append("No validation examples: no eval loss, no best-checkpoint selection, no early stopping.")
    dropped = train_stats["dropped"] + val_stats["dropped"]
    if dropped:
        warnings.append(f"{len(dropped)} example(s) dropped: nothing in them to learn from (see `dropped`).")
    data_stats = {"train": {k: v for k, v in train_stats.items() if k != "dropped"},
                  "validation": {k: v for k, v in val_stats.items() if k != "dropped"}}
    update_status(run_dir, data=data_stats, dropped=dropped[:100], warnings=warnings)
    if not train_rows:
        raise DataError("no example is left to train on (see `dropped` in status.json). "
                        "Fix: the examples need assistant replies within max_length.", file="train.jsonl")
    return train_rows, val_rows, train_stats, val_stats, data_stats


def _voice_plan(cfg: TrainConfig, tokenizer, train_rows: list[dict[str, Any]],
                val_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The voice check's inputs: the habit most agent replies share, prompts asked nowhere in training,
    and the new tokens a reply may take."""
    replies = [m["content"] for r in train_rows for m in r["messages"] if m["role"] == "assistant"]
    return {"marker": habit_of(replies),
            "prompts": held_out_prompts(train_rows, val_rows, cfg.voice_prompts, cfg.seed) if cfg.voice_prompts else [],
            "max_new_tokens": reply_budget(tokenizer, replies)}


def build_trainer(run_dir: Path, cfg: TrainConfig, dev: str, resume: bool = False,
                  progress: Callable[[dict[str, Any]], None] | None = None,
                  callbacks: list[TrainerCallback] | None = None):
    """Everything up to `trainer.train()`: data, model, SFTConfig, callbacks. Returns (trainer, context).

    Also used by the benchmark, so the measured recipe is the one users get.
    """
    check_data(run_dir)
    update_status(run_dir, phase="loading the model and the data")
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.base_model)
    chat_template = tokenizer.chat_template
    train_rows, val_rows, train_stats, val_stats, data_stats = _load_data(run_dir, cfg, tokenizer)
    prec = precision(cfg, dev)
    quant = quantization(cfg, dev)
    gpu = gpu_memory() if dev == "cuda" else None
    if gpu is not None:  # refuse a run that will not fit before loading it, naming the setting to change
        memory.check_fits(cfg, gpu[1], gpu[0])
    model = load_model(cfg.base_model, quantization=quant, dtype=prec["weights"], dev=dev)
    if cfg.method is Method.FULL:
        model.requires_grad_(True)
    if quant == Quantization.NF4.value and dev == "cpu":
        keep_4bit_layout_trainable(model)
    n_params = sum(p.numel() for p in model.parameters())
    gc_on = gradient_checkpointing(cfg, dev, n_params)
    text = model.config.get_text_config()
    attn = attention(dev, max(train_stats["longest"], val_stats["longest"]), packing_mode(cfg, dev), cfg.batch_size,
                     text.num_attention_heads, text.num_hidden_layers)
    if attn != model.config._attn_implementation:
        model.set_attn_implementation(attn)

    offset: dict[str, Any] = {}
    checkpoint = None
    if resume:
        removed = remove_incomplete_checkpoints(run_dir)
        checkpoints = complete_checkpoints(run_dir)
        checkpoint = checkpoints[-1] if checkpoints else None
        kept = truncate_metrics(run_dir, checkpoint_step(checkpoint) if checkpoint else 0)
        offset = offset_from(kept)
        update_status(run_dir, resumed_from=checkpoint.name if checkpoint else None, removed_incomplete=removed)
    elif is_main_process():
        if Run(run_dir).checkpoints_dir.exists():
            shutil.rmtree(Run(run_dir).checkpoints_dir)  # a fresh start must not rotate into old checkpoints
        Run(run_dir).metrics_file.unlink(missing_ok=True)

    voice = _voice_plan(cfg, tokenizer, train_rows, val_rows)
    marker, prompts, budget = voice["marker"], voice["prompts"], voice["max_new_tokens"]
    by_voice = bool(marker and prompts and val_rows)
    args = sft_config(cfg, run_dir, dev, prec, bool(val_rows), gc_on, resume=checkpoint is not None,
                      by_voice=by_voice, n_train=len(train_rows))
    recorder = RunRecorder(run_dir, offset, bool(val_rows), progress, model.config.get_text_config().vocab_size,
                           eval_share=cfg.eval_share, train_examples=len(train_rows))
    own: list[TrainerCallback] = [recorder]
    if by_voice:  # before the budget, which saves new bests by the metric this adds
        own.append(VoiceCheck(run_dir, marker, prompts[:CHECK_PROMPTS], chat_template, budget))
    own.append(OverheadBudget(cfg.eval_share, cfg.save_every_s))
    if cfg.early_stopping_patience > 0 and val_rows:
        own.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))

    def as_dataset(rows):  # tokenized here, with the loss mask derived from the model's template (tuner.templates)
        return Dataset.from_list([{"input_ids": r["input_ids"], "assistant_masks": r["assistant_masks"]}
                                  for r in rows]) if rows else None

    disable_progress_bars()  # trl's map() bars would flood train.log; tuner reports progress itself
    trainer = TunerSFTTrainer(model=model, args=args, train_dataset=as_dataset(train_rows),
                         eval_dataset=as_dataset(val_rows), processing_class=tokenizer,
                         peft_config=lora_config(cfg) if cfg.method is Method.LORA else None,
                         callbacks=own + list(callbacks or []))
    trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl and the progress callback instead
    full_eval = None
    if trainer.eval_dataset is not None and "input_ids" in trainer.eval_dataset.column_names:
        full_eval = trainer.eval_dataset
        trainer.eval_dataset = eval_sample(full_eval, cfg.eval_examples, cfg.seed)
        trainer.run_dir = run_dir
        if args.eval_on_start:
            trainer.base_eval_key = base_eval_key(cfg, dev, prec, quant, attn, trainer.eval_dataset,
                                                  args.per_device_eval_batch_size)
    context = {"full_eval": full_eval, "checkpoint": checkpoint, "recorder": recorder, "chat_template": chat_template,
               "quantization": quant, "data_stats": data_stats, "precision": prec, "has_eval": bool(val_rows),
               "best_by": ("voice" if by_voice else "loss") if val_rows else None,
               "voice": voice}
    processes = max(world_size(), 1)
    update_status(run_dir, device=dev, precision=prec["name"], precision_reason=precision_reason(cfg, dev),
                  processes=processes, effective_batch=cfg.batch_size * cfg.grad_accum * processes,
                  quantization=quant, gradient_checkpointing=gc_on, habit=marker.text if marker else None,
                  attention=attn,
                  batching=packing_mode(cfg, dev), threads=torch.get_num_threads() if dev == "cpu" else None,
                  parameters=n_params, trainable_parameters=sum(p.numel() for p in trainer.model.parameters()
                                                                if p.requires_grad))
    return trainer, context


def keep_4bit_layout_trainable(model) -> int:
    """Stop bitsandbytes repacking NF4 weights for CPU inference during evaluation.

    On CPUs with AVX512-BF16, a bitsandbytes Linear4bit called in eval mode without gradients converts
    its weight to an inference-only layout, and never converts it back: the training steps after the
    first evaluation then run through a kernel with no backward (torch warns "an autograd kernel was
    not registered"), and gradients through the frozen base are wrong. Returns the layers changed.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def fast_lora_casts(model):
    """Let autocast pick the LoRA matmul dtype instead of peft casting every input to the fp32 adapter dtype.

    The adapter keeps fp32 master weights (exact AdamW updates) while its matmuls run in bf16 like
    the base layers; on CPU this removes a copy per LoRA layer per step (measured ~1.2x).
    """
    return disable_input_dtype_casting(model)


CPU_TILES = (512, 8192)  # trl's LM-head tiles on CPU: tokens x vocabulary (see loss_positions_only)
# glibc's mallopt parameters (malloc.h) and what a CPU training process sets them to (see keep_freed_memory)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
CPU_HEAP = ((M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 * 2**20))


def keep_freed_memory() -> bool:
    """Let this process reuse the memory a training step frees instead of handing it back to the system.

    A CPU step allocates and frees hundreds of temporaries of 1-32 MB (activations, the LM head's tiles). glibc
    returns freed memory at the top of its heap to the system (and serves blocks above its moving threshold by
    mmap), so the next step faults the same pages in again; on the virtual machines measured that costs more
    than the arithmetic: a 2-core Intel Xeon with AMX spent 13-15 s in the first of six steps and 26.5 s in all
    six (bench data, bf16, NF4 base), 9.4-9.6 s and 23.0-23.2 s with this and the LM head in 16 MB tiles
    (CPU_TILES). The price: the process keeps its peak memory until it exits, which a training process does.
    Returns whether it took effect (glibc only; elsewhere the allocator is left alone)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in CPU_HEAP)


@contextlib.contextmanager
def training_context(model, prec: dict[str, Any]) -> Iterator[None]:
    """What `trainer.train()` runs inside: LoRA matmuls in autocast's dtype (under autocast only, where
    the adapter's fp32 weights and the half-precision base meet), loss on loss positions only, and on a CPU
    a heap that keeps what a step frees (keep_freed_memory)."""
    autocast = prec["bf16"] or prec["fp16"]
    cpu = next(model.parameters()).device.type == "cpu"
    if cpu:
        keep_freed_memory()
    with (fast_lora_casts(model) if autocast else contextlib.nullcontext()), loss_positions_only(cpu):
        yield


@contextlib.contextmanager
def loss_positions_only(cpu: bool = False) -> Iterator[None]:
    """Let trl's fused LM head score only the positions that carry loss on every device.

    trl scores just those positions where it runs Triton (CUDA/XPU) and every position elsewhere,
    to keep tile shapes fixed for compiling backends (Neuron). Eager CPU has no such concern, and
    the head's fp32 backward over a 49k vocabulary is the largest single cost of a CPU step, so
    scoring prompts and padding for nothing is pure waste. Only the choice of positions changes:
    the kernels (picked in trl.kernels) and the loss are the same. With `cpu`, the head's tiles are
    also smaller: CPU folds each tile in torch with ~8 fp32 temporaries, and trl's 4096 x 32768 tiles
    made them 512 MB each (1.9 GB of a training step's peak, measured; same losses, same CPU time); at
    512 x 8192 each is 16 MB, under glibc's mmap threshold, so a step reuses them (keep_freed_memory).
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        yield
        return
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:  # trl changed: keep its behaviour
        yield
        return
    import trl.kernels.chunked_logprob as trl_kernels

    tiles = (getattr(trl_kernels, "TOKEN_CHUNK_SIZE", None), getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None))
    trl_utils._use_triton = lambda device: original(device) or device.type == "cpu"
    if cpu and None not in tiles:
        trl_kernels.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_TILES
    try:
        yield
    finally:
        trl_utils._use_triton = original
        if cpu and None not in tiles:
            trl_kernels.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = tiles
