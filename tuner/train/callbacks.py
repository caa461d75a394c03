"""Trainer callbacks: what the run records as it trains, and how much of its time goes to overhead."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from transformers import TrainerCallback

from tuner.errors import TrainingError
from tuner.jobs import eval_allowed
from tuner.runs import append_metric, read_status, update_status


def from_rank0(value: Any) -> Any:
    """Rank 0's value in every process of a multi-process launch (the value itself in one process). Every
    process must call it at the same point: it is a collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def effective_batch(args) -> int:
    """Examples per optimizer step: per device x accumulation x processes (each process takes its own batches)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)


class RunRecorder(TrainerCallback):
    """Writes metrics.jsonl and status.json as training goes, and stops a run whose loss is broken."""

    def __init__(self, run_dir: Path, offset: dict[str, float], has_eval: bool,
                 progress: Callable[[dict[str, Any]], None] | None, vocab_size: int, eval_share: float = 1.0,
                 train_examples: int = 0, loss_terms: float = 1.0):
        self.run_dir = run_dir
        self.train_examples = train_examples  # epochs run = examples seen / this
        self.eval_share = eval_share
        self.phase_written = 0.0
        self.eval_batches = 0
        # a loss above ln(vocab) is worse than guessing every token uniformly: training has diverged; a loss that
        # adds weighted per-token terms (a preference loss plus its fine-tuning term) is allowed their total weight
        self.loss_terms = loss_terms
        self.max_loss = (math.log(max(vocab_size, 2)) + 1.0) * loss_terms
        self.has_eval = has_eval
        self.progress = progress
        self.started = time.monotonic()
        self.elapsed0 = offset.get("elapsed_s", 0.0)  # carried over from before a resume
        self.tokens0 = offset.get("tokens", 0)
        self.train_s = 0.0  # time inside optimizer steps only (no eval, no saving)
        self.window_s = 0.0
        self.window_tokens0 = 0
        self.steps_timed = 0
        self.step_start = 0.0
        self.eval_s = 0.0
        self.evals = 0
        self.first_eval_loss = offset.get("first_eval_loss")
        self.lowest = offset.get("lowest_eval_loss")
        self.last: dict[str, Any] = {}

    def elapsed(self) -> float:
        return self.elapsed0 + time.monotonic() - self.started

    def lowest_eval(self, record: dict[str, Any]) -> float | None:
        """The lowest validation loss so far (shown while training; the result's is the chosen step's)."""
        if record.get("eval_loss") is not None:
            self.lowest = record["eval_loss"] if self.lowest is None else min(self.lowest, record["eval_loss"])
        return self.lowest

    def on_train_begin(self, args, state, control, **kw):
        # start-up: from when the user's wait began (the job process's start, or train_run's call in-process)
        # to the first step
        began = read_status(self.run_dir).get("wait_from") or psutil.Process().create_time()
        total = state.max_steps * effective_batch(args)  # the examples of every process
        update_status(self.run_dir, status="running", max_steps=state.max_steps, step=state.global_step,
                      phase="training", examples_seen=self.examples_seen(args, state),
                      startup_s=round(time.time() - began, 1), examples_total=total,
                      train_examples=self.train_examples or None, epochs=self.epochs(total))

    def epochs(self, examples: int) -> float | None:
        """Passes over the training examples that `examples`, seen by all processes of a launch together, make;
        None when their number is unknown."""
        return round(examples / self.train_examples, 2) if self.train_examples else None

    def examples_seen(self, args, state) -> int:
        return int(state.global_step) * effective_batch(args)

    def phase(self, text: str, force: bool = False, **fields: Any) -> None:
        """Say what the run is doing now (status.json `phase`), at most twice a second unless forced."""
        now = time.monotonic()
        if force or now - self.phase_written >= 0.5:
            self.phase_written = now
            update_status(self.run_dir, phase=text, wall_s=round(self.elapsed(), 1), **fields)

    def on_step_begin(self, args, state, control, **kw):
        self.step_start = time.monotonic()
        self.phase(f"training: step {state.global_step + 1} of {state.max_steps}")

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
        self.eval_batches += 1
        total = len(eval_dataloader) if eval_dataloader is not None else None
        done = self.eval_batches if total is None else min(self.eval_batches, total)
        when = "before training" if state.global_step == 0 else f"at step {state.global_step}"
        self.phase(f"evaluating {when}: batch {done} of {total or '?'}", force=done == 1)

    def on_step_end(self, args, state, control, **kw):
        dt = time.monotonic() - self.step_start
        self.train_s += dt
        self.window_s += dt
        self.steps_timed += 1
        # evaluate the final weights too, so "best" can be the last step
        if self.has_eval and state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.evals += 1
        self.eval_batches = 0
        self.phase("training", force=True)

    def eta(self, state) -> float | None:
        if not self.steps_timed or not state.max_steps:
            return None
        left = max(state.max_steps - state.global_step, 0)
        eval_each = self.eval_s / self.evals if self.evals else 0.0
        # evaluations take at most eval_share of the time (OverheadBudget), and the last step is evaluated
        evals = min(self.eval_share * left * self.train_s / self.steps_timed, eval_each * left) + eval_each
        return round(left * self.train_s / self.steps_timed + (evals if self.has_eval and left else 0.0), 1)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        self.eval_s += float(logs.get("eval_all_runtime", 0.0))  # the final evaluation on every example
        step = int(state.global_step)
        record: dict[str, Any] = {"step": step, "loss": None, "eval_loss": None, "learning_rate": None,
                                  "tokens_per_s": None, "elapsed_s": round(self.elapsed(), 2), "eta_s": None}
        if "loss" in logs:
            loss = float(logs["loss"])
            grad = logs.get("grad_norm")
            if not math.isfinite(loss) or (grad is not None and not math.isfinite(float(grad))):
                raise TrainingError(f"The loss became {loss} at step {step} (grad norm {grad}): training "
                                    f"diverged. Fix: lower learning_rate (now {args.learning_rate:g}).")
            if loss > self.max_loss:
                per_token = f"{self.max_loss / self.loss_terms - 1:.1f}" + (
                    f" a token, times {self.loss_terms:g} for the loss's terms" if self.loss_terms != 1 else "")
                raise TrainingError(f"The loss rose to {loss:.1f} at step {step}, worse than guessing every "
                                    f"token at random ({per_token}): training diverged. "
                                    f"Fix: lower learning_rate (now {args.learning_rate:g}).")
            if loss == 0.0 and grad is not None and float(grad) == 0.0:
                raise TrainingError(f"The loss is exactly 0 with no gradient at step {step}: no token in the "
                                    "batch carries loss. Fix: check that the examples have assistant replies.")
            tokens = int(logs.get("num_tokens", 0))
            window_tokens = tokens - self.window_tokens0
            record.update(loss=loss, learning_rate=logs.get("learning_rate"), grad_norm=grad,
                          tokens=self.tokens0 + tokens,
                          tokens_per_s=round(window_tokens / self.window_s, 1) if self.window_s else None)
            self.window_tokens0, self.window_s = tokens, 0.0
        elif "eval_loss" in logs:
            eval_loss = float(logs["eval_loss"])
            self.eval_s += float(logs.get("eval_runtime", 0.0))
            if not math.isfinite(eval_loss):
                raise TrainingError(f"The validation loss became {eval_loss} at step {step}: training diverged. "
                                    f"Fix: lower learning_rate (now {args.learning_rate:g}).")
            record["eval_loss"] = eval_loss
            if self.first_eval_loss is None:
                self.first_eval_loss = eval_loss
        else:
            return  # the end-of-training summary; status.json gets it from train_run
        record["eta_s"] = self.eta(state)
        record["epoch"] = round(float(state.epoch or 0.0), 3)
        append_metric(self.run_dir, record)
        self.last = record
        update_status(self.run_dir, step=step, max_steps=state.max_steps, first_eval_loss=self.first_eval_loss,
                      eval_loss=self.lowest_eval(record), train_loss=record["loss"] or _status_loss(self.run_dir),
                      tokens_trained=record.get("tokens") or read_status(self.run_dir).get("tokens_trained", 0),
                      wall_s=record["elapsed_s"], eta_s=record["eta_s"], eta_at=time.time(),
                      examples_seen=self.examples_seen(args, state))
        if self.progress is not None:
            self.progress({**record, "max_steps": state.max_steps})

    def on_save(self, args, state, control, **kw):
        update_status(self.run_dir, last_checkpoint=f"checkpoint-{state.global_step}")

class OverheadBudget(TrainerCallback):
    """Keep evaluations and checkpoints to a share of the run's time, not a count of steps.

    On small data a run is mostly overhead when it evaluates and saves every N steps. Here an
    evaluation that eval_steps makes due is skipped when it would take evaluations over
    `eval_share` of the time so far; a checkpoint that save_steps makes due is skipped when the
    last one is under `save_every_s` old. The last step is always evaluated and saved, and a new
    best evaluation is always saved, so the best weights can be loaded at the end.
    Comes after RunRecorder (which asks for the last step's evaluation).
    """

    def __init__(self, eval_share: float, save_every_s: float):
        self.eval_share, self.save_every_s = eval_share, save_every_s
        self.started = self.last_save = self.eval_started = time.monotonic()
        self.eval_s = self.last_eval_s = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.started = self.last_save = self.eval_started = time.monotonic()  # eval_on_start starts now

    def on_step_end(self, args, state, control, **kw):
        now = time.monotonic()
        last = state.global_step >= state.max_steps
        if control.should_evaluate and not last and not eval_allowed(self.eval_s, self.last_eval_s,
                                                                     now - self.started, self.eval_share):
            control.should_evaluate = False
        if control.should_evaluate:
            self.eval_started = now
        if control.should_save and not last and now - self.last_save < self.save_every_s:
            control.should_save = False
        # decisions by the clock differ between processes: all follow rank 0, or one evaluates while another saves
        control.should_evaluate, control.should_save = from_rank0((control.should_evaluate, control.should_save))
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.last_eval_s = time.monotonic() - self.eval_started
        self.eval_s += self.last_eval_s
        value = (metrics or {}).get(args.metric_for_best_model or "eval_loss")
        best = state.best_metric
        better = best is None or (value > best if args.greater_is_better else value < best) if value is not None else False
        if state.global_step > 0 and better:
            control.should_save = True  # load_best_model_at_end needs the best on disk
        return control

    def on_save(self, args, state, control, **kw):
        self.last_save = time.monotonic()




def _status_loss(run_dir: Path) -> float | None:
    return read_status(run_dir).get("train_loss")
