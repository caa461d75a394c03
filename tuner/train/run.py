"""Train a run in this process: setup (build_trainer), train, save the result; failures become a status."""

from __future__ import annotations

import errno
import gc
import os
import resource
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import TrainerCallback

from tuner.config import Method, TrainConfig
from tuner.errors import TrainingError, TunerError
from tuner.models import device
from tuner.runs import (
    Run,
    complete_checkpoints,
    is_main_process,
    machine_lock,
    read_metrics,
    read_status,
    remove_incomplete_checkpoints,
    resolve,
    update_status,
)
from tuner.train.callbacks import effective_batch
from tuner.train.checkpoints import eval_loss_at, finished, first, last, restore_finished
from tuner.train.result import model_card, save_result, write_card
from tuner.train.trainer import build_trainer, training_context
from tuner.train.voicecheck import final_verdict

OOM_ADVICE = ("Fix: lower batch_size (now {batch_size}), lower max_length (now {max_length}), "
              "use quantization nf4 (now {quantization}), or set gradient_checkpointing to 'on'.")


def train_run(run_dir: str | Path, resume: bool = False,
              progress: Callable[[dict[str, Any]], None] | None = None,
              callbacks: list[TrainerCallback] | None = None, waited_from: float | None = None) -> dict[str, Any]:
    """Train the run in this process and return its final status.

    `waited_from`: when the user's wait began (the job process's start; default: now), from which the
    run's start-up and total time (`startup_s`, `total_s`, what the estimate learns from) are counted.

    `resume=True` continues an interrupted/failed/cancelled run from its last complete checkpoint.
    `progress`, if given, is called with every metrics record; `callbacks` are added to the Trainer
    (measurement, extra behaviour) after tuner's own. Never raises for a failed run:
    the returned status says `failed` and `error` says why and what to change (TunerError is
    raised only when the run cannot start at all).
    """
    run_dir = resolve(Path(run_dir) if Path(run_dir).is_dir() else run_dir).path
    cfg = Run(run_dir).config()
    status = read_status(run_dir)
    if status.get("status") == "completed":
        raise TrainingError(f"{run_dir.name} is already completed; its result is in {status.get('adapter')}.")
    if resume and status.get("status") == "queued" and not complete_checkpoints(run_dir):
        resume = False  # nothing to resume from: start it
    with machine_lock(run_dir):
        started = time.monotonic()
        update_status(run_dir, status="running", error=None, pid=os.getpid(), pid_started=proc_start(os.getpid()),
                      started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), saved_at=None,
                      wait_from=waited_from or time.time())
        dev = "cpu"
        try:
            dev = device()
            return _train(run_dir, cfg, resume, progress, dev, callbacks or [])
        except KeyboardInterrupt:
            return update_status(run_dir, status="cancelled", error="Stopped from the keyboard. Resume to continue.",
                                 pid=None, phase=None)
        except TunerError as exc:
            return update_status(run_dir, status="failed", error=str(exc), pid=None, phase=None)
        except Exception as exc:  # the run fails; the caller (app, CLI) keeps going
            if is_oom(exc):
                error = "Out of memory. " + OOM_ADVICE.format(batch_size=cfg.batch_size, max_length=cfg.max_length,
                                                              quantization=cfg.quantization.value)
            elif _disk_full(exc, run_dir):
                error = (f"The disk is full ({exc}). Earlier checkpoints and results were kept. "
                         "Fix: free disk space, then resume.")
            else:
                error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()  # into train.log when run by tuner.jobs
            remove_incomplete_checkpoints(run_dir)
            return update_status(run_dir, status="failed", error=error, pid=None, phase=None,
                                 wall_s=round(read_status(run_dir).get("wall_s") or 0.0, 1),
                                 session_s=round(time.monotonic() - started, 1))
        finally:
            release_memory(dev)


def _train(run_dir: Path, cfg: TrainConfig, resume: bool, progress, dev: str,
           callbacks: list[TrainerCallback]) -> dict[str, Any]:
    trainer, ctx = build_trainer(run_dir, cfg, dev, resume, progress, callbacks)
    checkpoint, recorder = ctx["checkpoint"], ctx["recorder"]
    if checkpoint is not None and finished(checkpoint):
        # killed after the last step (during the final save): the Trainer, resumed there, would run one
        # step too many, so the result is taken from the checkpoints as they are
        restore_finished(trainer, run_dir, checkpoint, cfg)
        train_runtime = 0.0
    else:
        with training_context(trainer.model, ctx["precision"]):
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_runtime = result.metrics.get("train_runtime", 0.0)

    # the final result: best weights (load_best_model_at_end), written whole or not at all
    trainer.processing_class.chat_template = ctx["chat_template"]  # ship the model's own template
    full_eval, scored = ctx["full_eval"], trainer.eval_dataset
    eval_all = None
    if full_eval is not None and scored is not None and len(full_eval) > len(scored):
        update_status(run_dir, phase=f"evaluating the result on all {len(full_eval)} validation examples")
        with training_context(trainer.model, ctx["precision"]):  # loss positions only, as during training
            eval_all = trainer.evaluate(eval_dataset=full_eval, metric_key_prefix="eval_all").get("eval_all_loss")
    metrics = read_metrics(run_dir)
    best_step = trainer.state.best_global_step
    best_loss = eval_loss_at(metrics, best_step) if ctx["has_eval"] else None
    summary = {
        "step": int(trainer.state.global_step),
        "max_steps": int(trainer.state.max_steps),
        "best_step": best_step,
        "best_by": ctx["best_by"],
        "first_eval_loss": recorder.first_eval_loss,
        "eval_loss": best_loss,
        "final_eval_loss": last(metrics, "eval_loss"),
        "first_loss": first(metrics, "loss"),
        "train_loss": last(metrics, "loss"),
        "tokens_trained": last(metrics, "tokens") or 0,
        "early_stopped": trainer.state.global_step < trainer.state.max_steps,
        "quantization": ctx["quantization"],
        "eval_examples": len(scored) if scored is not None else 0,
        # every validation example, scored on the final weights (the same as eval_loss when the sample is all)
        "eval_loss_all": eval_all if eval_all is not None else best_loss,
        "examples_seen": int(trainer.state.global_step) * effective_batch(trainer.args),
        "epochs": recorder.epochs(int(trainer.state.global_step) * effective_batch(trainer.args)),
    }
    # the result first: saved, reloaded and compared before the voice check, so it is on disk (and the
    # playground can serve it) while the check runs, and a check that fails or is stopped loses nothing
    out_dir = Run(run_dir).model_dir if cfg.method is Method.FULL else Run(run_dir).adapter_dir
    update_status(run_dir, phase="saving and checking the result")
    save_result(trainer, cfg, run_dir, out_dir,
                model_card(cfg, summary, ctx["data_stats"], ctx["precision"]["name"], dev, run_dir))
    summary["saved_s"] = round(recorder.elapsed(), 1)
    update_status(run_dir, adapter=str(out_dir), saved_at=time.time(), saved_s=summary["saved_s"])
    voice = ctx["voice"]
    summary["voice"] = None
    if cfg.voice_prompts and is_main_process():  # a launch's other processes would only repeat rank 0's check
        if voice["prompts"]:  # the time left counts down from what the check took here last time
            from tuner.jobs import final_check_s, measured_here

            expected = final_check_s(cfg.base_model, dev, measured_here(cfg.base_model), None,
                                     Run(run_dir).data_dir, len(voice["prompts"]))
            update_status(run_dir, phase=f"the result is saved; asking it and the base {len(voice['prompts'])} "
                                         "new questions (the voice check)", eta_s=round(expected, 1),
                          eta_at=time.time())
        voice_started = time.monotonic()
        release_trainer_model(trainer, dev)  # the playground's copy below is what gets graded
        from tuner.playground import Playground

        pg = None
        if voice["marker"] is not None and voice["prompts"]:
            pg = Playground(device=dev)
            pg.load_run(run_dir)  # as the Playground tab serves the saved result: its dtype, its generation code
        summary["voice"] = final_verdict(pg, run_dir, voice["marker"], voice["prompts"], voice["max_new_tokens"],
                                         fast_perplexity=ctx["precision"]["bf16"])
        if pg is not None:
            summary["voice"]["served_quantization"] = pg.base_key[1] if pg.base_key else None
            summary["voice"]["served_dtype"] = str(pg.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        del pg
        # what the estimate learns from: seconds per held-out prompt asked of both the result and the base
        summary["voice_s"] = round(time.monotonic() - voice_started, 1)
        write_card(out_dir, model_card(cfg, summary, ctx["data_stats"], ctx["precision"]["name"], dev, run_dir))
    summary["wall_s"] = round(recorder.elapsed(), 1)
    summary["eval_s"] = round(recorder.eval_s, 1)  # every evaluation, the final one included
    # what the user waited, start-up included (a resumed run: this session only): what the estimate learns from
    summary["total_s"] = round(time.time() - (read_status(run_dir).get("wait_from") or time.time()), 1)
    return update_status(run_dir, status="completed", phase="done", error=None, adapter=str(out_dir), pid=None, eta_s=0,
                         peak_memory_mb=peak_memory_mb(dev),
                         train_runtime_s=round(train_runtime, 1), **summary)


def peak_memory_mb(dev: str) -> float:
    if dev == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "cannot allocate memory" in text)


def _disk_full(exc: BaseException, run_dir: Path) -> bool:
    """ENOSPC anywhere in the chain; torch.save reports it only as "file write failed", so also a nearly full disk."""
    seen: BaseException | None = exc
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or "no space left" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return "write" in str(exc).lower() and shutil.disk_usage(run_dir).free < 16 * 2**20
    except OSError:
        return False


def release_trainer_model(trainer, dev: str) -> None:
    """Drop the trained model once its result is saved, so a second copy never sits beside the served one."""
    trainer.model = trainer.model_wrapped = None
    release_memory(dev)


def release_memory(dev: str) -> None:
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


def proc_start(pid: int) -> float | None:
    """The process start time, so a recycled pid is never mistaken for the training process."""
    try:
        return psutil.Process(pid).create_time()
    except Exception:
        return None
