"""A completed run trained on replies that all end with one sign-off (for playground/eval/export tests).

Trained by tuner.train with the "quick" preset, shortened (a sign-off is learned in a few large steps).
"""

from __future__ import annotations

import json
from pathlib import Path

# a sign-off is easy to learn: a few large steps do it, and keep the suite fast
OVERRIDES = {"max_steps": 10, "batch_size": 4, "learning_rate": 2e-3, "max_length": 128, "quantization": "none",
             "eval_steps": 10, "save_steps": 10}


def write_data(data_dir: Path, conversations: list[dict], n_val: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", conversations[:-n_val]), ("validation.jsonl", conversations[-n_val:])):
        with open(data_dir / name, "w", encoding="utf-8") as fh:
            for row in part:
                fh.write(json.dumps(row) + "\n")


def make_signoff_run(run_dir: Path, conversations: list[dict], n_val: int = 8) -> Path:
    from tuner import runs, train
    from tuner.config import TrainConfig

    data = run_dir.parent / f"{run_dir.name}-data"
    write_data(data, conversations, n_val)
    cfg = TrainConfig.from_preset("quick", **OVERRIDES)
    run = runs.prepare_run(cfg, data, run_dir=run_dir)
    status = train.train_run(run)
    assert status["status"] == "completed", status
    return run
