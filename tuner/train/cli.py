"""`python -m tuner train`: every TrainConfig field as a flag, progress on the terminal, the status at the end.

One training job a machine: when another job holds it (or runs already wait for it), the command waits in
the machine's queue (tuner.jobs.submit), printing its place, and follows its run once the queue starts it;
`--no-queue` refuses instead, as before. A job process hands the machine to the next queued run as it exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from tuner import audit
from tuner.config import (
    DEFAULT_PRESET,
    PRESETS,
    Method,
    PreferenceConfig,
    Quantization,
    TrainConfig,
    add_config_arguments,
    choices,
    config_overrides,
    explicit_length,
)
from tuner.errors import MachineBusy, TunerError
from tuner.progress import epochs_run, fmt_duration, took
from tuner.runs import Run, is_main_process, prepare_run, resolve, update_status, world_size
from tuner.train.run import train_run


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="Folder with train.jsonl and validation.jsonl (from `convert`).")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help=f"Start from a preset (default: {DEFAULT_PRESET}, as on the page); flags override it.")
    parser.add_argument("--config", help="A TrainConfig as YAML/JSON (a run's config.yaml re-creates that run); "
                                         "flags override it.")
    parser.add_argument("--out", help="Run folder to create (default: a new folder under the runs directory).")
    parser.add_argument("--resume", metavar="RUN_DIR", help="Continue an interrupted run from its last checkpoint.")
    parser.add_argument("--run", metavar="RUN_DIR", help=argparse.SUPPRESS)  # a prepared run, used by tuner.jobs
    parser.add_argument("--json", action="store_true", help="Print the final status as one JSON object.")
    parser.add_argument("--no-queue", action="store_true",
                        help="When another training job holds this machine, stop with an error (exit 2) instead of "
                             "waiting in the machine's queue. By default the command waits in line (the place is "
                             "printed as it changes; the app's Train tab lists the same queue), then trains and "
                             "reports as usual; Ctrl-C leaves the queue, or cancels the run once it trains.")
    parser.add_argument("--owner", metavar="NAME", help="Who the new run belongs to (the page shows it to NAME's "
                                                        "teams, TUNER_TEAMS); default: this machine's user.")
    settings = parser.add_argument_group("training settings (every TrainConfig field; see also --config)")
    steps = settings.add_mutually_exclusive_group()
    add_config_arguments(settings, TrainConfig, skip=("preset", "method"), aliases={"num_epochs": "--epochs"},
                         group=steps)
    # preference tuning (issue 15): --method dpo|kto --from RUN [--prefs FILE]; tuner.train.preference
    parser.add_argument("--method", choices=(*choices(TrainConfig, "method"), "dpo", "kto"), default=None,
                        help="lora|full: SFT on --data; dpo|kto: preference tuning of --from RUN. "
                             + TrainConfig.help()["method"])
    parser.add_argument("--from", dest="parent", metavar="RUN", help="dpo/kto: the finished run to start from.")
    parser.add_argument("--prefs", metavar="FILE", help="Preference pairs as JSONL ({prompt, chosen, "
                                                       "rejected} a line; kto learns from them as thumbs, chosen up, "
                                                       "rejected down); default: the --from run's feedback.")
    # PreferenceConfig's own fields (beta, loss, sft_weight, ...); the names it shares with TrainConfig are above
    prefs = parser.add_argument_group("preference settings (--method dpo|kto; learning rate, steps, batch size and "
                                      "length: the flags above)")
    add_config_arguments(prefs, PreferenceConfig, skip=PREFERENCE_SHARED)


PREFERENCE_SHARED = tuple(f.name for f in fields(PreferenceConfig) if f.name in {g.name for g in fields(TrainConfig)}
                          or f.name == "method")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = config_overrides(args, TrainConfig)  # only the flags the user typed
    if args.config:  # a length given on the command line wins over the file's bounds too
        return TrainConfig.from_dict(explicit_length(TrainConfig.load(args.config).to_dict(), overrides))
    if args.method == Method.FULL.value and args.quantization is None:
        overrides["quantization"] = Quantization.NONE.value  # full fine-tuning cannot train 4-bit weights
    return TrainConfig.from_preset(args.preset or DEFAULT_PRESET, **overrides)


def progress_printer(json_mode: bool) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    """A tqdm bar on a terminal; plain lines into a log file; nothing on stdout in --json mode."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    bar: dict[str, Any] = {}

    def update(record: dict[str, Any]) -> None:
        if tty:
            if "bar" not in bar:
                bar["bar"] = tqdm(total=record.get("max_steps"), unit="step", file=sys.stderr, dynamic_ncols=True)
            b = bar["bar"]
            b.total = record.get("max_steps") or b.total
            b.update(record["step"] - b.n)
            post = {}
            if record.get("loss") is not None:
                post["loss"] = f"{record['loss']:.3f}"
            if record.get("eval_loss") is not None:
                bar["eval"] = f"{record['eval_loss']:.3f}"
            if "eval" in bar:
                post["eval"] = bar["eval"]
            if record.get("tokens_per_s"):
                post["tok/s"] = f"{record['tokens_per_s']:.0f}"
            b.set_postfix(post, refresh=True)
        elif record.get("eval_loss") is not None or not json_mode:
            print(json.dumps(record), file=sys.stderr, flush=True)

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return update, close


def owner_of(args: argparse.Namespace) -> dict[str, Any]:
    """The new run's owner: --owner NAME (else the machine's user), with NAME's teams from TUNER_TEAMS."""
    from tuner import auth

    name = getattr(args, "owner", None) or auth.machine_user()
    return {"name": name, "teams": list(auth.teams_of(name))}


def cli(args: argparse.Namespace) -> int:
    try:
        return _cli(args)
    finally:
        if is_main_process() and world_size() == 1:  # the machine is free: the next queued run starts
            from tuner.jobs import hand_over

            hand_over()


def _cli(args: argparse.Namespace) -> int:
    if args.method in ("dpo", "kto") or args.parent or args.prefs or _is_preference(args.resume or args.run):
        return _cli_preference(args)
    given = [f"--{k.replace('_', '-')}" for k in config_overrides(args, PreferenceConfig) if k not in PREFERENCE_SHARED]
    if given:
        raise TunerError(f"{', '.join(given)}: preference setting(s), for a preference run. Fix: add --method dpo "
                         "--from RUN (or drop them for fine-tuning on --data).")
    if args.resume or args.run:
        run_dir = resolve(args.resume or args.run).path
        resume = bool(args.resume)
    else:
        if not args.data:
            raise TunerError("Give --data DIR (the folder `convert` wrote), or --resume RUN_DIR.")
        cfg = config_from_args(args)
        resume = False
        if world_size() > 1:  # accelerate launch / torchrun: rank 0 prepares, the others join its folder
            if not args.out:
                raise TunerError("Under a multi-process launch give --out RUN_DIR, so every process uses one run.")
            run_dir = Path(args.out).expanduser().resolve()
            if is_main_process():
                prepare_run(cfg, args.data, run_dir, owner=owner_of(args))
            else:
                deadline = time.monotonic() + 600
                while not Run(run_dir).status_file.is_file() and time.monotonic() < deadline:
                    time.sleep(0.5)
        else:
            run_dir = prepare_run(cfg, args.data, args.out, owner=owner_of(args))
            audit.record(owner_of(args)["name"], "train", Path(run_dir).name, owner_of(args), "command line")
        if not args.json:
            print(f"run folder: {run_dir}", file=sys.stderr)
    if not is_main_process():  # rank 0 reports; the other processes of a launch train quietly beside it
        status = train_run(run_dir, resume=resume)
        return 0 if status["status"] == "completed" else 1
    if not args.json:
        print(batch_line(Run(run_dir).config()), file=sys.stderr)
    update, close = progress_printer(args.json)
    try:
        status = train_here_or_wait(run_dir, resume, args, update)
    finally:
        close()
    if args.json:
        keys = ("status", "error", "adapter", "first_eval_loss", "eval_loss", "train_loss", "step", "max_steps",
                "tokens_trained", "wall_s", "peak_memory_mb", "device", "precision", "best_step", "best_by",
                "examples_seen", "epochs", "train_examples", "total_s", "eval_loss_all", "voice", "processes",
                "effective_batch")
        verdict = (status.get("voice") or {}).get("sentence")
        print(json.dumps({"run": str(run_dir), "verdict": verdict, **{k: status.get(k) for k in keys}}))
    else:
        print(final_words(status, run_dir), file=sys.stderr)
    return 0 if status["status"] == "completed" else 1


QUEUE_POLL_S = 2.0  # how often a command waiting in line looks at the queue (and moves it on)


def train_here_or_wait(run_dir: Path, resume: bool, args: argparse.Namespace,
                       update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Train in this process when the machine is free and nobody waits for it; else (unless --no-queue) wait in
    the machine's queue and follow the run as a job once the queue starts it. The run's final status."""
    from tuner import jobs

    here = bool(args.run) or world_size() > 1  # a job tuner.jobs started (it holds the lock), or a launch
    owner = owner_of(args)["name"]
    waiting = [] if here else [r for r in jobs.queue_rows() if r["state"] == "waiting"]
    if here or not waiting:
        if not here and not Run(run_dir).status().get("owner"):
            update_status(run_dir, owner=owner)  # the queue's view names who trains
        try:
            return train_run(run_dir, resume=resume, progress=update, waited_from=_process_start())
        except MachineBusy:
            if here or args.no_queue:
                raise
    elif args.no_queue:
        raise MachineBusy(f"{len(waiting)} run(s) wait in this machine's queue for the one training slot. Fix: "
                          "leave out --no-queue to wait in line, or start it later.")
    return wait_in_line(run_dir, resume, owner, args.json, update)


def wait_in_line(run_dir: Path, resume: bool, owner: str, quiet: bool,
                 update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Queue the run, say its place whenever it changes, move the queue on while waiting (no app may be running),
    then follow the started job's progress from its files. Ctrl-C leaves the queue, or cancels the job."""
    from tuner import jobs

    jobs.submit(run_dir, owner=owner, resume=resume)
    said: tuple | None = None
    try:
        while (where := jobs.place(run_dir)) is not None:
            place = (where["position"], [(r["state"], jobs.whose(r)) for r in where["ahead"]])
            if not quiet and place != said and (sentence := jobs.queue_sentence(run_dir)):  # its place changed
                print(f"{sentence} Ctrl-C leaves the queue.", file=sys.stderr, flush=True)
            said = place
            time.sleep(QUEUE_POLL_S)
            jobs.dispatch()
        if not quiet and said:
            print(f"started: {run_dir.name} (its output goes to {Run(run_dir).log_file})", file=sys.stderr, flush=True)
        seen = 0
        while True:
            status = jobs.read_status(run_dir)
            records = jobs.read_metrics(run_dir)
            for record in records[seen:]:
                update({**record, "max_steps": status.get("max_steps")})
            seen = len(records)
            if status.get("status") not in ("queued", "running"):
                return status
            time.sleep(QUEUE_POLL_S / 2)
    except KeyboardInterrupt:
        jobs.cancel(run_dir)  # leaves the queue, or stops the job this command was following
        raise


def batch_line(cfg: TrainConfig) -> str:
    """The examples each optimizer step learns from, said once at the start (several processes multiply it)."""
    processes = max(world_size(), 1)
    effective = cfg.batch_size * cfg.grad_accum * processes
    return (f"effective batch: {effective} examples a step ({cfg.batch_size} per process x {cfg.grad_accum} "
            f"accumulation x {processes} process{'es' if processes > 1 else ''})")


def final_words(status: dict[str, Any], run_dir: Path) -> str:
    """The run's end on the terminal: its state, result, losses, the length it really trained (steps and
    epochs) and the time the user waited, and the voice verdict."""
    line = f"{status['status']}: {run_dir}"
    if status.get("error"):
        line += f"\n{status['error']}"
    elif status.get("adapter"):
        line += (f"\nresult: {status['adapter']}\neval loss {status.get('first_eval_loss')} -> "
                 f"{status.get('eval_loss')} in {epochs_run(status)}, "
                 f"{fmt_duration(took(status))}")
        if (status.get("voice") or {}).get("sentence"):
            line += f"\nvoice: {status['voice']['sentence']}"
    return line


def _cli_preference(args: argparse.Namespace) -> int:
    """`python -m tuner train --method dpo|kto --from RUN [--prefs FILE] [--out DIR] [--json]`, and
    `--run/--resume DIR` of a preference run (tuner.jobs starts those like any run)."""
    from tuner import feedback
    from tuner.train.preference import METHODS, prepare_preference_run, status_keys, train_preference

    if args.resume or args.run:
        run_dir, resume = resolve(args.resume or args.run).path, bool(args.resume)
    else:
        if not args.parent:
            raise TunerError("Preference tuning starts from a finished run. Fix: add --from RUN.")
        if args.data:
            raise TunerError("--data is for SFT; preference tuning reads pairs. Fix: drop --data, and give "
                             "--prefs FILE or nothing (the --from run's feedback).")
        overrides = config_overrides(args, PreferenceConfig)
        overrides["method"] = args.method if args.method in METHODS else "dpo"
        run_dir = prepare_preference_run(args.parent, PreferenceConfig.from_dict(overrides), args.prefs, args.out,
                                         owner=owner_of(args), given=set(overrides) - {"method"})
        resume = False
        if not args.json:
            print(f"run folder: {run_dir}", file=sys.stderr)
    update, close = progress_printer(args.json)
    try:
        status = train_preference(run_dir, resume=resume, progress=update)
    finally:
        close()
    if args.json:
        keys = ("status", "error", "adapter", "train_loss", "step", "max_steps", "wall_s", "peak_memory_mb",
                "device", "precision", "voice", *status_keys())
        verdict = (status.get("voice") or {}).get("sentence")
        behaviour = (status.get("behaviour") or {}).get("sentence")  # what the run changed leads, then the rest
        print(json.dumps({"run": str(run_dir), "result": behaviour, "verdict": verdict,
                          **{k: status.get(k) for k in keys}}))
    else:
        line = f"{status['status']}: {run_dir}"
        if status.get("error"):
            line += f"\n{status['error']}"
        elif status.get("adapter"):
            pairs = feedback.pairs_sentence(status.get("preference_metrics") or {}, method=status["method"].upper())
            line += (f"\n{(status.get('behaviour') or {}).get('sentence', '')}\n{pairs}\n"
                     f"result: {status['adapter']} ({status.get('step')} steps, {status.get('wall_s')} s)")
            if (status.get("voice") or {}).get("sentence"):
                line += f"\nvoice: {status['voice']['sentence']}"
        print(line, file=sys.stderr)
    return 0 if status["status"] == "completed" else 1


def _process_start() -> float | None:
    """When this process started: for a job the app starts, when the user pressed Train."""
    import psutil

    try:
        return psutil.Process().create_time()
    except psutil.Error:
        return None


def _is_preference(run: str | None) -> bool:
    from tuner.train.preference import is_preference_run

    return bool(run) and is_preference_run(resolve(run).path)
