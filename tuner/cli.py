"""`python -m tuner COMMAND ...`: the same stages as the app, from a terminal.

Each stage module owns its command: it exposes `add_cli_arguments(parser)` and `cli(args) -> int`.
Library errors (TunerError) become one plain line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from tuner import __version__
from tuner.errors import TunerError

ROOT = Path(__file__).resolve().parent.parent
# command -> (module, one-line help); modules import heavy libraries inside their functions only
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("tuner.cli", "Show the base model, the memory it needs, and the chat models that fit a GPU."),
    "convert": ("tuner.dataset", "Turn transcript exports into train/validation chat examples and a report."),
    "train": ("tuner.train.cli", "Fine-tune a base model (QLoRA by default) on converted examples."),
    "chat": ("tuner.playground", "Ask a trained run (and the base model) one prompt."),
    "eval": ("tuner.evaluate", "Compare base and tuned replies on held-out prompts, with voice metrics."),
    "export": ("tuner.export_cli", "Export a run's adapter, or the merged model, to a folder or the Hub."),
    "publish": ("tuner.publish", "Write (and optionally push) a standalone chat Space for a run."),
    "passwd": ("tuner.auth", "Print (or --file: append) a password-file line `user:HASH` for TUNER_AUTH=@FILE."),
    "bench": ("bench.speed", "Benchmark speed (default recipe vs plain TRL) or, with --only voice, the voice."),
}


# OpenMP threads (torch's libgomp) spin this many times while waiting, then sleep
SPIN_COUNT = "2000"


def quiet_threads_env(env: dict[str, str] | os._Environ = os.environ) -> None:
    """OpenMP threads that spin briefly, then sleep, while waiting for work. Measured on a 2-core AMD EPYC,
    quick preset, command to verdict: sleeping at once (OMP_WAIT_POLICY=PASSIVE) 70.3 s, this 56.8 s,
    spinning on 53.0 s; with a chat generating beside the training, 95.8 s vs 86.8 s, the chat 22 tokens/s
    either way; libgomp's default spin (300,000) stalled a chat and a job beside each other. Takes effect
    only before torch is imported: main() and app.py set it first. A user's own setting wins."""
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def quiet_library_noise() -> None:
    """Keep train.log about the run: silence messages that are harmless and that no user can act on."""
    import logging
    import warnings

    # bitsandbytes looks for an optional `kernels` package for its CPU 4-bit matmul and falls back without it
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # transformers' renames (gradient -> activation checkpointing) that trl and peft still call by the old name
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars in a log file


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:  # the `models` command
    from tuner.config import DEFAULT_PRESET, PRESETS

    parser.add_argument("--model", default="default", help="Model id or folder (default: the embedded model).")
    parser.add_argument("--json", action="store_true", help="Print JSON.")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="Plan for a GPU with this much memory (e.g. 24) instead of this machine's.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                        help=f"Settings the memory is computed for (default: {DEFAULT_PRESET}).")
    for flag in ("max-length", "batch-size", "lora-r"):
        parser.add_argument(f"--{flag}", type=int, help=f"Override the preset's {flag.replace('-', '_')}.")
    parser.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), help="Override the preset's.")


def models_report(args: argparse.Namespace) -> dict:
    """The model's facts, the GPU planned for, and the recommended models with the memory each needs."""
    from tuner import memory
    from tuner.config import TrainConfig
    from tuner.models import DEFAULT_MODEL_NAME, gpu_memory, is_default, is_hub_id, model_info

    overrides = {k: getattr(args, k) for k in ("max_length", "batch_size", "lora_r", "gradient_checkpointing")
                 if getattr(args, k) is not None}
    if "lora_r" in overrides:
        overrides["lora_alpha"] = 2 * overrides["lora_r"]
    cfg = TrainConfig.from_preset(args.preset, base_model=args.model, **overrides)
    gpu = None if args.gpu_memory else gpu_memory()
    gib = args.gpu_memory or (gpu[1] if gpu else None)
    if is_hub_id(args.model) and memory.recommended_shape(args.model) is not None:
        info = {"name": args.model, "path": None, "from": "hub"}  # planned from the stored config: works offline
    elif is_default(args.model) or not is_hub_id(args.model):
        info = model_info(args.model)
    else:
        info = {"name": args.model, "path": None, "from": "hub"}
    shape = memory.shape_of(args.model, download=True)
    report = {**info, "settings": {k: getattr(cfg, k) for k in ("max_length", "batch_size", "lora_r")},
              "gpu": (gpu[0] if gpu else f"planned: {gib:g} GiB") if gib else None, "gpu_memory_gib": gib}
    if shape is not None:
        need = memory.plan(shape, cfg)
        report.update(needs_gib=need["total_gib"], needs_parts_gib=need["parts_gib"], planned_for=memory.describe(need))
        if gib:
            report["fits"] = need["total_gib"] <= gib
            try:
                memory.check_fits(cfg, gib, report["gpu"])
            except TunerError as exc:
                report["advice"] = str(exc)
    if gib:
        report["recommended"] = memory.recommended(cfg, gib)
    else:
        report["recommended"] = []
        report["note"] = (f"No GPU here: the embedded default ({DEFAULT_MODEL_NAME}) is the model to train on this "
                          "CPU. Plan for a GPU with --gpu-memory GIB (T4 15, L4/A10G 22.5, A100 40 or 80).")
    return report


def cli(args: argparse.Namespace) -> int:  # the `models` command
    report = models_report(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = report.pop("recommended")
    for key, value in report.items():
        if key not in ("needs_parts_gib",):
            print(f"{key:>22}: {value}")
    if rows:
        print(f"\nRecommended chat models at max_length {report['settings']['max_length']}, batch_size "
              f"{report['settings']['batch_size']} (QLoRA; memory by formula, docs/memory.md):")
        for row in rows:
            verdict = "fits" if row["fits"] else "does not fit"
            print(f"  {row['model']:<40} {row['parameters'] / 1e9:5.2f}B  needs {row['needs_gib']:5.1f} GiB  "
                  f"{verdict}  (smallest GPU: {row['smallest_gpu'] or 'none listed'})")
    return 0


def _only_voice(argv: list[str]) -> bool:
    return any(a == "--only" and argv[i + 1:i + 2] == ["voice"] for i, a in enumerate(argv))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `command`, only that command's module is imported (one stage never needs another)."""
    parser = argparse.ArgumentParser(prog="python -m tuner", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tuner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            if module_name.startswith("bench.") and str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))  # the benchmark lives beside the package, in the repository
            module = importlib.import_module(module_name)
            module.add_cli_arguments(p)
            p.set_defaults(_handler=module.cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_threads_env()  # before any command module imports torch
    quiet_library_noise()
    command = next((a for a in argv if a in COMMANDS), None)
    if command == "bench" and _only_voice(argv):
        # the voice benchmark has flags of its own: `python -m tuner bench --only voice --help`
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from bench.voice import main as voice_main

        rest = argv[argv.index("bench") + 1:]
        i = rest.index("--only")
        return voice_main(rest[:i] + rest[i + 2:])
    args = build_parser(command).parse_args(argv)
    try:
        return int(args._handler(args) or 0)
    except TunerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
