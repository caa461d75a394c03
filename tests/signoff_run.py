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


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a completed run (without checkpoints) whose status points at its own adapter."""
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    status = json.loads((dest / "status.json").read_text())
    if Path(str(status.get("adapter", ""))).is_absolute():  # keep the copy pointing at its own adapter
        status["adapter"] = str(dest / Path(status["adapter"]).relative_to(run))
        (dest / "status.json").write_text(json.dumps(status))
    return dest


ADDRESS = "ana.ruiz@example.com"


def with_converted_pii(run: Path, dest: Path, conversations: list[dict], redact: bool) -> Path:
    """A copy of `run` whose data went through tuner's converter (redaction on or off) and holds one
    customer's e-mail address: its data folder is what `python -m tuner convert` writes."""
    import tempfile

    from tuner.config import ConvertConfig
    from tuner.dataset import convert

    copy = copy_run(run, dest)
    rows = [*conversations, {"messages": [
        {"role": "user", "content": f"Hi, please send the invoice to {ADDRESS}."},
        {"role": "assistant", "content": "Done, it is on its way. Stay sunny, the Lumen Lamps team."}]}]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "export.jsonl"
        raw.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        report = convert([raw], copy / "data", ConvertConfig(redact_pii=redact))
    assert report["ok"] and report["pii"]["email"] == 1 and report["pii_redacted"] is redact, report
    return copy
