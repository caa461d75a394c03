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
    """12 s, 3 min 05 s, 1 h 02 min; "under 1 s" (never "0.0 min")."""
    if seconds is None:
        return "—"
    if 0 < seconds < 0.5:
        return "under 1 s"
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


def took(status: dict[str, Any]) -> float | None:
    """The run's time, the one figure every view shows: what the user waited (total_s, start-up included),
    or the training clock (wall_s) where that is longer (a resumed run counts its earlier sessions)."""
    times = [float(t) for t in (status.get("total_s"), status.get("wall_s")) if isinstance(t, (int, float))]
    return max(times) if times else None


def elapsed(status: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds the run has been going: from when the user's wait began while active (a moving clock), else
    its recorded time (took)."""
    began = status.get("wait_from")
    started = float(began) if isinstance(began, (int, float)) else _epoch(status.get("started_at"))
    if status.get("status") in ACTIVE and started is not None:
        return max((now or time.time()) - started, 0.0)
    return took(status)


def _eta_written(status: dict[str, Any]) -> float | None:
    """When the status's eta_s was written (eta_at; older runs: the status's last write)."""
    at = status.get("eta_at")
    return float(at) if isinstance(at, (int, float)) else _epoch(status.get("updated_at"))


def overrun(status: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds the running phase has gone past its estimate (negative: time still left); None when unknown."""
    eta = status.get("eta_s")
    if status.get("status") != "running" or eta is None or not int(status.get("step") or 0):
        return None
    written = _eta_written(status)
    return ((now or time.time()) - written if written is not None else 0.0) - float(eta)


def time_left(status: dict[str, Any], now: float | None = None) -> float | None:
    """The run's last estimate of the time left, counted down since it was written; None when unknown."""
    over = overrun(status, now)
    return None if over is None else max(-over, 0.0)


def passes(examples: float, n_train: Any) -> str:
    """"2.04 epochs of 94 examples": how many times `examples` seen go over the training set."""
    epochs = examples / int(n_train)
    return f"{epochs:.3g} epoch{'' if f'{epochs:.3g}' == '1' else 's'} of {int(n_train):,} examples"


def epochs_run(status: dict[str, Any]) -> str:
    """The run's length as it really is (a finished run) or will be (an active one): "24 steps (2.04 epochs
    of 94 examples)"; the steps alone when the number of training examples is unknown (older runs)."""
    active = status.get("status") in ACTIVE
    steps = int(status.get("max_steps" if active else "step") or 0)
    seen = status.get("examples_total" if active else "examples_seen")
    words = f"{steps} step{'' if steps == 1 else 's'}"
    if status.get("train_examples") and seen:
        words += f" ({passes(seen, status['train_examples'])})"
    return words


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
        over_data = f" ({passes(planned, status['train_examples'])})" if status.get("train_examples") else ""
        bits.append(f"{seen:,} of {planned:,} examples seen{over_data}")
    elif seen:
        bits.append(f"{seen:,} examples seen")
    clock = elapsed(status, now)
    if clock is not None and (clock or state in ACTIVE):
        bits.append(f"{'running for' if state in ACTIVE else 'took'} {fmt_duration(clock)}")
    over = overrun(status, now)
    if over is not None and over < -0.5:
        bits.append(f"about {fmt_duration(-over)} left")
    elif over is not None:  # the estimate ran out while work remains: a clock that moves, never "0 s left"
        bits.append(f"{fmt_duration(over + float(status['eta_s']))} in this part, "
                    f"{fmt_duration(over)} longer than estimated")
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
        if verdict and not isinstance(status.get("preference"), dict):  # a preference run's result says it, parent beside
            out.append(f"Voice check on new questions: {verdict.rstrip('.')}.")
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


SMOOTHING = 0.6  # weight of the past in the smoothed train loss (an EMA, debiased like TensorBoard's)
SMOOTHED = "train loss (smoothed)"


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """An exponential moving average of `values`, debiased so it starts at the first value, not at 0.

    >>> [round(v, 2) for v in smoothed([4.0, 2.0, 3.0], 0.5)]
    [4.0, 2.67, 2.86]
    """
    out, ema = [], 0.0
    for i, v in enumerate(values, start=1):
        ema = weight * ema + (1 - weight) * v
        out.append(ema / (1 - weight**i))
    return out


def loss_points(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train loss (per step and smoothed) and held-out loss by step: [{step, loss, series}], for a plot
    coloured by series. A step logged twice (a resumed run) counts once, its last record."""
    train = {int(m["step"]): float(m["loss"]) for m in metrics if m.get("loss") is not None}
    rows = []
    for m in metrics:
        if m.get("loss") is not None:
            rows.append({"step": int(m["step"]), "loss": float(m["loss"]), "series": "train loss"})
        if m.get("eval_loss") is not None:
            rows.append({"step": int(m["step"]), "loss": float(m["eval_loss"]), "series": "held-out loss"})
    steps = sorted(train)
    rows += [{"step": step, "loss": round(value, 4), "series": SMOOTHED}
             for step, value in zip(steps, smoothed([train[s] for s in steps]), strict=True)]
    return rows
