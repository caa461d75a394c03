"""What a training run is doing, in words: its phase, a clock that moves, the log as sentences.

Pure functions over a run's status.json and metrics.jsonl records (as `tuner.jobs.read_status` and
`read_metrics` return them), plus the tail of its train.log. The Train tab polls these every few
seconds; they read the clock themselves, so "running for" moves between two writes of the status.
Fields that newer runs write (`phase`, `examples_seen`, `examples_total`) are read with .get():
older runs are described from step counts alone.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

ACTIVE = ("queued", "running")
LOG_TAIL_BYTES = 64 * 1024  # train.log is read from its end: only the last lines are shown
LOG_LINES = 40  # raw log lines shown (newest first)
STATE_LABELS = {"queued": "Queued", "running": "Training", "completed": "Completed", "failed": "Failed",
                "cancelled": "Cancelled", "interrupted": "Interrupted (resume it)"}


def fmt_duration(seconds: float | None) -> str:
    """12 s, 3 min 05 s, 1 h 02 min."""
    if seconds is None:
        return "—"
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


def _epoch(stamp: Any) -> float | None:
    """A status time stamp ("2026-11-30T08:12:01+0000") as seconds since the epoch."""
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def phase(status: dict[str, Any]) -> str:
    """What the run is doing now, in plain words."""
    state = status.get("status")
    if state == "queued":
        return "waiting for the machine"
    if state != "running":
        return STATE_LABELS.get(str(state), str(state)).lower()
    if status.get("phase"):
        return str(status["phase"])
    step = int(status.get("step") or 0)
    if step == 0:
        return "loading the model and measuring the starting loss"
    return "training"


def elapsed(status: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds the run has been going: from its start while active (a moving clock), else its recorded time."""
    started = _epoch(status.get("started_at"))
    if status.get("status") in ACTIVE and started is not None:
        return max((now or time.time()) - started, 0.0)
    return status.get("wall_s")


def time_left(status: dict[str, Any], now: float | None = None) -> float | None:
    """The trainer's last estimate of the time left, counted down since it was written; None when unknown."""
    eta = status.get("eta_s")
    written = _epoch(status.get("updated_at"))
    if status.get("status") != "running" or eta is None or not int(status.get("step") or 0):
        return None
    if written is not None:
        eta -= (now or time.time()) - written
    return max(eta, 0.0)


def examples_seen(status: dict[str, Any], batch_size: int, grad_accum: int) -> tuple[int, int | None]:
    """(examples the run has trained on, examples it will train on), from the status or its step count."""
    per_step = max(batch_size, 1) * max(grad_accum, 1)
    total = int(status.get("max_steps") or 0) * per_step or None
    if status.get("examples_seen") is not None:
        return int(status["examples_seen"]), status.get("examples_total") or total
    return int(status.get("step") or 0) * per_step, total


def summary(status: dict[str, Any], batch_size: int = 1, grad_accum: int = 1, now: float | None = None) -> str:
    """One line: phase, step n of N, examples seen, clock, time left, speed, losses."""
    state = str(status.get("status", "unknown"))
    step, total = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    now_doing = phase(status)
    bits = [now_doing[:1].upper() + now_doing[1:] if state == "running" else STATE_LABELS.get(state, state)]
    if state != "running" or "step" not in now_doing:  # a phase like "training: step 3 of 12" says it already
        bits.append(f"step {step} / {total or '?'}")
    seen, planned = examples_seen(status, batch_size, grad_accum)
    if planned:
        bits.append(f"{seen:,} of {planned:,} examples seen")
    elif seen:
        bits.append(f"{seen:,} examples seen")
    clock = elapsed(status, now)
    if clock is not None and (clock or state in ACTIVE):
        bits.append(f"{'running for' if state in ACTIVE else 'took'} {fmt_duration(clock)}")
    left = time_left(status, now)
    if left is not None:
        bits.append(f"about {fmt_duration(left)} left" if left >= 1 else "finishing the last steps")
    first, best = status.get("first_eval_loss"), status.get("eval_loss")
    if first is not None and best is not None and best != first:
        bits.append(f"held-out loss {first:.3f} → {best:.3f}")
    elif first is not None:
        bits.append(f"held-out loss at the start {first:.3f}")
    return " · ".join(bits)


def sentences(status: dict[str, Any], metrics: list[dict[str, Any]]) -> list[str]:
    """The run's story so far, newest first: one plain sentence per logged step and evaluation."""
    out: list[str] = []
    first_eval: float | None = None
    total = status.get("max_steps") or "?"
    for m in metrics:
        step = m.get("step")
        if m.get("eval_loss") is not None:
            loss = float(m["eval_loss"])
            if first_eval is None:
                first_eval = loss
                out.append(f"Step {step}: loss on the held-out examples is {loss:.3f} (the starting point).")
            else:
                trend = "down" if loss < first_eval else "up"
                out.append(f"Step {step}: loss on the held-out examples is {loss:.3f}, {trend} from {first_eval:.3f}.")
        elif m.get("loss") is not None:
            speed = f", {m['tokens_per_s']:.0f} tokens/s" if m.get("tokens_per_s") else ""
            out.append(f"Step {step} of {total}: training loss {float(m['loss']):.3f}{speed}.")
    state = status.get("status")
    if state == "running":
        out.append(f"Now: {phase(status)}.")
    elif state == "completed":
        out.append("Finished: the adapter is saved and checked; try it on the Playground tab.")
        verdict = (status.get("voice") or {}).get("sentence")
        if verdict:
            out.append(f"Voice check on new questions: {verdict}.")
    elif state in ("failed", "cancelled", "interrupted") and status.get("error"):
        out.append(f"Stopped ({state}): {status['error']}")
    elif state in ("cancelled", "interrupted"):
        out.append(f"Stopped ({state}). Resume continues from the last checkpoint.")
    return list(reversed(out))


def log_tail(path: str | Path, lines: int = LOG_LINES) -> str:
    """The last lines of a run's log file, newest first (progress bars redraw with \\r: keep their last state)."""
    path = Path(path)
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(path.stat().st_size - LOG_TAIL_BYTES, 0))
        text = fh.read().decode("utf-8", errors="replace")
    kept = [line.split("\r")[-1].rstrip() for line in text.split("\n")]
    return "\n".join(reversed([line for line in kept if line.strip()][-lines:]))


def loss_points(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train and held-out loss by step: [{step, loss, series}], for a plot coloured by series."""
    rows = []
    for m in metrics:
        if m.get("loss") is not None:
            rows.append({"step": int(m["step"]), "loss": float(m["loss"]), "series": "train loss"})
        if m.get("eval_loss") is not None:
            rows.append({"step": int(m["step"]), "loss": float(m["eval_loss"]), "series": "held-out loss"})
    return rows
