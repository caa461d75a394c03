"""TrainConfig -> library objects: LoRA, precision, quantization, attention, batching, SFTConfig.

Small pure functions, each a decision the run records in its status (heavy module: imports torch).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from trl import SFTConfig

from tuner.config import Method, Quantization, TrainConfig
from tuner.models import EAGER_MAX_SCORE_BYTES, attention_score_bytes
from tuner.precision import describe, for_model
from tuner.runs import Run, world_size


def lora_config(cfg: TrainConfig):
    targets: str | list[str] = cfg.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def precision(cfg: TrainConfig, dev: str) -> dict[str, Any]:
    """Weights dtype and autocast for this device.

    CUDA: bf16 where supported (fp16 otherwise). CPU: whichever of bf16 and fp32 a short probe
    measured faster on this machine (tuner.precision; cached), since no flag rule held across CPU
    families. Full fine-tuning keeps fp32 master weights under autocast, since AdamW updates
    vanish in bf16 weights.
    """
    choice = cfg.precision_choice(dev)
    if choice == "fp32":
        return {"name": "fp32", "weights": torch.float32, "bf16": False, "fp16": False}
    half = torch.bfloat16 if choice == "bf16" else torch.float16
    if cfg.method is Method.FULL:
        return {"name": f"{choice} autocast", "weights": torch.float32, "bf16": choice == "bf16",
                "fp16": choice == "fp16"}
    # LoRA: frozen base in half precision; the adapter keeps fp32 weights and autocast runs its matmuls in half
    return {"name": choice, "weights": half, "bf16": choice == "bf16", "fp16": choice == "fp16"}


def precision_reason(cfg: TrainConfig, dev: str) -> str:
    """Why this precision, in words, for the run's status and the Train tab."""
    if cfg.precision != "auto":
        return f"{cfg.precision} (set in the run's settings)"
    if dev == "cuda":
        return "chosen for this GPU"
    return describe(for_model(cfg.base_model))


def quantization(cfg: TrainConfig, dev: str) -> str:
    """The base's storage: 'nf4' or 'none' (TrainConfig.uses_nf4 says when 'auto' is NF4)."""
    return Quantization.NF4.value if cfg.uses_nf4() else Quantization.NONE.value


def gradient_checkpointing(cfg: TrainConfig, dev: str, n_params: int) -> bool:
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing == "on"
    return dev == "cuda" and n_params > 1_000_000_000  # small models fit without it, and run ~30% faster


def packing_mode(cfg: TrainConfig, dev: str) -> str:
    """How batches avoid padding: 'packed' (trl bfd packing, padding-free) or 'grouped' (length-grouped batches).

    Packing flattens a batch into one row with position ids reset per example: flash attention on
    CUDA keeps the examples apart at no cost. With SDPA (CPU) the same row needs a dense
    block-diagonal mask whose cost grows with the square of the row, so there we group
    examples of similar length instead, which also keeps them apart.
    """
    if not cfg.packing:
        return "padded"
    if dev == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "packed"
    return "grouped"


def attention(dev: str, longest: int, batching: str, batch_size: int = 1, heads: int = 1, layers: int = 1) -> str:
    """The attention kernel: flash attention for packed rows (it keeps packed examples apart without a
    mask), else SDPA, except on CPU for small batches of short examples, where eager attention was
    measured 1.2x faster (SmolLM2, bf16, 80-300 tokens). Eager keeps every layer's attention scores for
    the backward pass (fp32 + a bf16 copy, ~6 bytes each): at 8 x 512 tokens that was 3.6 GB of the
    quick preset's 11 GB peak, so eager is used only while those scores stay under EAGER_MAX_SCORE_BYTES."""
    if batching == "packed":
        return "flash_attention_2"
    scores = attention_score_bytes(batch_size, heads, layers, longest)
    return "eager" if dev == "cpu" and scores <= EAGER_MAX_SCORE_BYTES else "sdpa"


def sft_config(cfg: TrainConfig, run_dir: Path, dev: str, prec: dict[str, Any], has_eval: bool,
               gc: bool, resume: bool, by_voice: bool = False, n_train: int = 0):
    """The SFTConfig; `by_voice`: the best checkpoint (and early stopping) follow the voice check
    (tuner.train.voicecheck adds eval_voice, higher is better), else the validation loss.
    The number of steps is TrainConfig.planned_steps for `n_train` examples."""
    mode = packing_mode(cfg, dev)
    keep_best = has_eval
    return SFTConfig(
        output_dir=str(Run(run_dir).checkpoints_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.planned_steps(n_train, world_size()) if n_train else cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_length=cfg.max_length,
        # tuner hands trl tokenized examples whose `assistant_masks` (tuner.templates) become the labels;
        # trl's own option would need {% generation %} markers in the template
        assistant_only_loss=False,
        packing=mode == "packed",
        train_sampling_strategy="group_by_length" if mode == "grouped" else "random",
        gradient_checkpointing=gc,
        bf16=prec["bf16"],
        fp16=prec["fp16"],
        use_cpu=dev == "cpu",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        eval_on_start=has_eval and not resume,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        # the Trainer counts the best checkpoint inside the limit; +1 keeps the last N *and* the best
        save_total_limit=cfg.save_total_limit + (1 if keep_best else 0),
        load_best_model_at_end=keep_best,
        metric_for_best_model=("eval_voice" if by_voice else "eval_loss") if keep_best else None,
        greater_is_better=by_voice if keep_best else None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must reach the recorder as NaN (the filter logs it as 0.0)
        report_to="none",
        disable_tqdm=True,  # tuner draws its own bar (with eval loss and ETA) from the same records
        dataloader_num_workers=0,
        # several processes (DDP): every LoRA weight takes part in each step, so skip DDP's search for unused ones
        ddp_find_unused_parameters=False if cfg.method is Method.LORA else None,
        remove_unused_columns=True,
    )
