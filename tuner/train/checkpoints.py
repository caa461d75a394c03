"""Resuming: where a resumed run picks up, and a run killed after its last step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerState

from tuner.config import Method, TrainConfig
from tuner.runs import Run, read_json


def finished(checkpoint: Path) -> bool:
    """True if training had ended at this checkpoint (last step reached, or stopped early)."""
    state = read_json(checkpoint / "trainer_state.json", {})
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
    stopped = bool((control.get("args") or {}).get("should_training_stop"))
    return stopped or state.get("global_step", 0) >= state.get("max_steps", math.inf)


def restore_finished(trainer, run_dir: Path, checkpoint: Path, cfg: TrainConfig) -> None:
    """Load the trainer state and the result weights (the best checkpoint when there is one) from disk."""
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    source = checkpoint
    best = trainer.state.best_model_checkpoint
    if best and (Run(run_dir).checkpoints_dir / Path(best).name).is_dir():
        source = Run(run_dir).checkpoints_dir / Path(best).name  # found by name: the run folder may have moved
    if cfg.method is Method.LORA:
        set_peft_model_state_dict(trainer.model, load_file(str(source / "adapter_model.safetensors")))
    else:
        weights: dict[str, Any] = {}
        for f in sorted(source.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        trainer.model.load_state_dict(weights, strict=False)


def offset_from(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"elapsed_s": records[-1]["elapsed_s"] if records else 0.0,
            "tokens": last(records, "tokens") or 0,
            "first_eval_loss": first(records, "eval_loss"),
            "lowest_eval_loss": min((r["eval_loss"] for r in records if r.get("eval_loss") is not None), default=None)}


def eval_loss_at(records: list[dict[str, Any]], step: int | None) -> float | None:
    """The validation loss recorded at `step` (the best checkpoint's), or None."""
    return next((r["eval_loss"] for r in reversed(records) if r["step"] == step and r.get("eval_loss") is not None),
                None)


def first(records: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in records if r.get(key) is not None), None)


def last(records: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)
