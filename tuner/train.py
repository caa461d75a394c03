"""Fine-tune a base model on converted examples: TrainConfig -> trl SFTTrainer (QLoRA) -> runs/<id>/adapter/.

A run folder holds everything about one run, so it can be inspected, resumed and shared:

    runs/<id>/
      config.yaml          the TrainConfig; the run is re-created from it alone
      data/                train.jsonl, validation.jsonl (+ report.json) copied at prepare time,
                           sources.json with their sha256, sizes and where they came from
      status.json          queued|running|completed|failed|cancelled|interrupted, losses, step, pid
      metrics.jsonl        one JSON object a line: step, loss, eval_loss, learning_rate, tokens_per_s, ...
      train.log            the training process's output (when started by tuner.jobs)
      checkpoints/checkpoint-<step>/   the Trainer's own format; resume uses resume_from_checkpoint
      adapter/             final LoRA adapter + tokenizer + README.md model card (method lora)
      model/               final weights + tokenizer + README.md (method full)

Every file a reader polls is written atomically (temp file + os.replace), and the final adapter is
written to a temporary folder and renamed only after it reloads, so a kill at any moment never
leaves a half-written result that looks finished.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuner.config import PRESETS, Method, Quantization, TrainConfig
from tuner.errors import DataError, TrainingError, TunerError
from tuner.paths import new_run_id, resolve_run, runs_dir, tuner_home

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
DATA_DIR = "data"
SOURCES_FILE = "sources.json"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
DATA_FILES = ("train.jsonl", "validation.jsonl", "report.json")
STATUSES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
ACTIVE = ("queued", "running")
RESUMABLE = ("interrupted", "failed", "cancelled")
LOCK_FILE = "train.lock"
LOCK_FD_ENV = "TUNER_TRAIN_LOCK_FD"  # set by tuner.jobs: the child inherits the machine-wide lock
ROLES = ("system", "user", "assistant")
EAGER_MAX_TOKENS = 512  # CPU: eager attention up to this example length (see attention())

OOM_ADVICE = ("Fix: lower batch_size (now {batch_size}), lower max_length (now {max_length}), "
              "use quantization nf4 (now {quantization}), or set gradient_checkpointing to 'on'.")


# -- files that readers poll ----------------------------------------------------------------------


def is_main_process() -> bool:
    """False in the extra processes of `accelerate launch` / torchrun: only rank 0 writes the run's files."""
    return os.environ.get("RANK", "0") == "0"


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader (or a kill -9) never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file as a dict; {} when it is missing, damaged or not an object."""
    value = read_json(path)
    return value if isinstance(value, dict) else {}


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """The run's status.json as a dict (status 'unknown' if it cannot be read)."""
    status = read_json(Path(run_dir) / STATUS_FILE)
    return status if isinstance(status, dict) else {"status": "unknown", "error": "status.json is missing or damaged"}


def update_status(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into status.json (atomically) and return the new status."""
    status = read_status(run_dir)
    if status.get("status") == "unknown":
        status = {}
    status.update(fields)
    status["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if is_main_process():
        write_json_atomic(Path(run_dir) / STATUS_FILE, status)
    return status


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of metrics.jsonl; a torn last line (kill -9 while appending) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    out: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    out.append(record)
    return out


def _append_metric(run_dir: Path, record: dict[str, Any]) -> None:
    if not is_main_process():
        return
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(run_dir: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the records up to `last_step` (the checkpoint a resume starts from), so the curve stays continuous."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    if not is_main_process():
        return kept
    tmp = run_dir / f".{METRICS_FILE}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, run_dir / METRICS_FILE)
    return kept


# -- data -----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_examples(path: Path) -> list[dict[str, Any]]:
    """Read one chat example per line ({"messages": [{"role", "content"}, ...]}), checking the shape.

    Each returned example carries `_line` (1-based) so later reports can name it.
    """
    rows: list[dict[str, Any]] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot open ({exc.strerror}).", file=str(path)) from exc
    except UnicodeDecodeError:
        raise DataError("is not UTF-8 text. Fix: re-run `python -m tuner convert`.", file=str(path)) from None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"not valid JSON ({exc.msg}). Fix: one JSON object per line, as `convert` writes.",
                            file=str(path), line=number) from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError('expected {"messages": [{"role": ..., "content": ...}, ...]}. '
                            "Fix: run `python -m tuner convert` on the raw export.", file=str(path), line=number)
        for i, msg in enumerate(messages):
            if not (isinstance(msg, dict) and msg.get("role") in ROLES and isinstance(msg.get("content"), str)):
                raise DataError(f"message {i} needs a role ({', '.join(ROLES)}) and a text content.",
                                file=str(path), line=number)
        rows.append({"messages": messages, "_line": number})
    return rows


def _trained_turns(messages: list[dict[str, Any]]) -> int:
    """Assistant turns that carry loss (the OpenAI format's `weight: 0` turns do not)."""
    return sum(1 for m in messages if m["role"] == "assistant" and m.get("weight", 1) != 0)


def inspect_examples(rows: list[dict[str, Any]], tokenizer, chat_template: str | None, max_length: int,
                     file: str = "train.jsonl") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tokenize each example as the trainer will and drop those that would train nothing.

    An example is dropped when it has no assistant reply to learn from, or when its replies all lie
    beyond `max_length` (truncation keeps the start). Returns (kept rows, statistics with a
    `dropped` list naming file and line).
    """
    kept, dropped = [], []
    tokens = trained = truncated = longest = 0
    for row in rows:
        where = {"file": file, "line": row.get("_line")}
        if chat_template is not None and _trained_turns(row["messages"]) == 0:
            dropped.append({**where, "reason": "no assistant reply to learn from"})
            continue
        out = tokenizer.apply_chat_template(row["messages"], chat_template=chat_template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=chat_template is not None)
        ids = out["input_ids"]
        mask = out["assistant_masks"] if chat_template is not None else [1] * len(ids)
        if len(ids) > max_length:
            truncated += 1
        n_trained = sum(mask[:max_length])
        if n_trained == 0:
            dropped.append({**where, "reason": f"every reply lies beyond max_length={max_length} tokens"})
            continue
        tokens += min(len(ids), max_length)
        longest = max(longest, min(len(ids), max_length))
        trained += n_trained
        kept.append(row)
    stats = {"examples": len(kept), "tokens": tokens, "trained_tokens": trained, "truncated": truncated,
             "longest": longest, "dropped": dropped}
    return kept, stats


def prepare_run(cfg: TrainConfig, data_dir: str | Path, run_dir: str | Path | None = None) -> Path:
    """Create a run folder: config.yaml, a copy of the data with sha256 hashes, and status 'queued'."""
    data_dir = Path(data_dir).expanduser()
    train_file = data_dir / "train.jsonl"
    if not train_file.is_file():
        raise DataError("no train.jsonl here. Fix: point --data at the folder that `python -m tuner convert` wrote.",
                        file=str(data_dir))
    counts = {name: len(read_examples(data_dir / name)) for name in DATA_FILES[:2] if (data_dir / name).is_file()}
    if counts["train.jsonl"] == 0:
        raise DataError("has no examples. Fix: convert more conversations.", file=str(train_file))
    if run_dir is None:
        run_dir = runs_dir() / new_run_id()
    run_dir = Path(run_dir).expanduser().resolve()
    if (run_dir / CONFIG_FILE).exists():
        raise TrainingError(f"{run_dir} already holds a run. Fix: pick another --out, or resume it with "
                            f"`python -m tuner train --resume {run_dir}`.")
    (run_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
    sources = {}
    for name in DATA_FILES:
        src = data_dir / name
        if src.is_file():
            shutil.copyfile(src, run_dir / DATA_DIR / name)
            sources[name] = {"sha256": _sha256(src), "bytes": src.stat().st_size, "examples": counts.get(name),
                             "source": str(src.resolve())}
    write_json_atomic(run_dir / DATA_DIR / SOURCES_FILE, sources)
    cfg.save(run_dir / CONFIG_FILE)
    update_status(run_dir, status="queued", error=None, step=0, max_steps=None, adapter=None,
                  first_eval_loss=None, eval_loss=None, train_loss=None, tokens_trained=0, wall_s=0.0,
                  peak_memory_mb=None, pid=None, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return run_dir


def _check_data(run_dir: Path) -> None:
    """The copied data must still be what prepare_run hashed (a changed file would silently change the run)."""
    sources = read_json(run_dir / DATA_DIR / SOURCES_FILE, {})
    for name, info in sources.items():
        path = run_dir / DATA_DIR / name
        if not path.is_file() or _sha256(path) != info.get("sha256"):
            raise DataError("changed or missing since the run was prepared (sha256 differs). "
                            "Fix: start a new run from the data.", file=str(path))


# -- config -> library objects --------------------------------------------------------------------


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets: str | list[str] = cfg.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def cpu_precision_choice(base_model: str) -> dict[str, Any]:
    """The measured CPU precision for this base model's shapes (tuner.precision; cached per machine)."""
    from tuner.models import resolve_model
    from tuner.precision import cpu_precision, model_shapes

    location = Path(resolve_model(base_model))
    config = read_json(location / "config.json", {}) if location.is_dir() else {}
    return cpu_precision(model_shapes(config or {}))


def precision(cfg: TrainConfig, dev: str) -> dict[str, Any]:
    """Weights dtype and autocast for this device.

    CUDA: bf16 where supported (fp16 otherwise). CPU: whichever of bf16 and fp32 a short probe
    measured faster on this machine (tuner.precision; cached), since no flag rule held across CPU
    families. Full fine-tuning keeps fp32 master weights under autocast, since AdamW updates
    vanish in bf16 weights.
    """
    import torch

    choice = cfg.precision
    if choice == "auto":
        if dev == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            choice = cpu_precision_choice(cfg.base_model)["choice"]
    if choice == "fp32":
        return {"name": "fp32", "weights": torch.float32, "bf16": False, "fp16": False}
    half = torch.bfloat16 if choice == "bf16" else torch.float16
    if cfg.method is Method.FULL:
        return {"name": f"{choice} autocast", "weights": torch.float32, "bf16": choice == "bf16",
                "fp16": choice == "fp16"}
    # LoRA: frozen base in half precision; the adapter keeps fp32 weights and autocast runs its matmuls in half
    return {"name": choice, "weights": half, "bf16": choice == "bf16", "fp16": choice == "fp16"}


def _precision_reason(cfg: TrainConfig, dev: str) -> str:
    """Why this precision, in words, for the run's status and the Train tab."""
    if cfg.precision != "auto":
        return f"{cfg.precision} (set in the run's settings)"
    if dev == "cuda":
        return "chosen for this GPU"
    from tuner.precision import describe

    return describe(cpu_precision_choice(cfg.base_model))


def quantization(cfg: TrainConfig, dev: str) -> str:
    """The base's storage: 'auto' is nf4 (QLoRA) for LoRA on a GPU and on a CPU alike (the same code path;
    on this project's 2-core CPU a 4-bit step runs at the speed of a bf16 one, `python -m tuner bench`),
    and none for full fine-tuning, which trains the base weights themselves."""
    if cfg.method is Method.FULL:
        return Quantization.NONE.value
    if cfg.quantization is Quantization.AUTO:
        return Quantization.NF4.value
    return cfg.quantization.value


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
    if dev == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "packed"
    return "grouped"


def attention(dev: str, longest: int, batching: str) -> str:
    """The attention kernel: flash attention for packed rows (it keeps packed examples apart without a
    mask), else SDPA, except on CPU for short examples, where eager attention was measured 1.2x faster
    (SmolLM2, bf16, 80-300 tokens); its memory grows with the square of the length, so long examples
    keep SDPA."""
    if batching == "packed":
        return "flash_attention_2"
    return "eager" if dev == "cpu" and longest <= EAGER_MAX_TOKENS else "sdpa"


def length_grouped_batches(lengths: list[int], batch_size: int, generator=None) -> list[int]:
    """Indices whose consecutive `batch_size` slices hold examples of similar length, batches in random order.

    transformers' LengthGroupedSampler sorts within mega-batches of at most 50 batches, but shrinks them
    so that an epoch has at least 4: on a few hundred examples a mega-batch is 1 to 6 batches and most
    of a step is padding (measured 56% fill on the benchmark's 23 examples). Here the mega-batches are
    always 50 batches (the library's own grouping function), and randomness comes from shuffling the
    order of the batches instead; the batch with the longest example stays first, so a batch that
    does not fit in memory fails at step 1, and a short last batch stays last.
    """
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    order = get_length_grouped_indices(lengths, batch_size, mega_batch_mult=50, generator=generator)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches.sort(key=lambda b: -max(lengths[i] for i in b))  # longest first, then the others shuffled
    first, rest = batches[:1], batches[1:]
    tail = [b for b in rest if len(b) < batch_size]
    rest = [b for b in rest if len(b) == batch_size]
    shuffled = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    return [i for b in first + shuffled + tail for i in b]


def _trainer_class():
    import torch
    from trl import SFTTrainer

    class GroupedSampler(torch.utils.data.Sampler):
        def __init__(self, lengths: list[int], batch_size: int):
            self.lengths, self.batch_size = lengths, batch_size

        def __len__(self) -> int:
            return len(self.lengths)

        def __iter__(self):
            return iter(length_grouped_batches(self.lengths, self.batch_size))

    class TunerSFTTrainer(SFTTrainer):
        """trl's SFTTrainer with tighter length grouping (see length_grouped_batches)."""

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if (self.args.train_sampling_strategy != "group_by_length" or self.args.world_size > 1
                    or dataset is None or "input_ids" not in dataset.column_names):
                return super()._get_train_sampler(train_dataset)
            lengths = [len(ids) for ids in dataset["input_ids"]]
            return GroupedSampler(lengths, self.args.train_batch_size)  # each forward's batch is what pads

    return TunerSFTTrainer


def sft_config(cfg: TrainConfig, run_dir: Path, dev: str, prec: dict[str, Any], has_eval: bool,
               gc: bool, resume: bool):
    from trl import SFTConfig

    mode = packing_mode(cfg, dev)
    keep_best = has_eval
    return SFTConfig(
        output_dir=str(run_dir / CHECKPOINTS_DIR),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_length=cfg.max_length,
        assistant_only_loss=cfg.assistant_only_loss,
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
        metric_for_best_model="eval_loss" if keep_best else None,
        greater_is_better=False if keep_best else None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must reach the recorder as NaN (the filter logs it as 0.0)
        report_to="none",
        disable_tqdm=True,  # tuner draws its own bar (with eval loss and ETA) from the same records
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )


# -- progress, metrics and failure detection -------------------------------------------------------


def _recorder_class():
    from transformers import TrainerCallback

    class RunRecorder(TrainerCallback):
        """Writes metrics.jsonl and status.json as training goes, and stops a run whose loss is broken."""

        def __init__(self, run_dir: Path, offset: dict[str, float], has_eval: bool,
                     progress: Callable[[dict[str, Any]], None] | None, vocab_size: int, eval_share: float = 1.0):
            self.run_dir = run_dir
            self.eval_share = eval_share
            self.phase_written = 0.0
            self.eval_batches = 0
            # a loss above ln(vocab) is worse than guessing every token uniformly: training has diverged
            self.max_loss = math.log(max(vocab_size, 2)) + 1.0
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
            self.last: dict[str, Any] = {}

        def elapsed(self) -> float:
            return self.elapsed0 + time.monotonic() - self.started

        def on_train_begin(self, args, state, control, **kw):
            update_status(self.run_dir, status="running", max_steps=state.max_steps, step=state.global_step,
                          phase="training", examples_seen=self.examples_seen(args, state))

        def examples_seen(self, args, state) -> int:
            return int(state.global_step) * args.per_device_train_batch_size * args.gradient_accumulation_steps

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
                    raise TrainingError(f"The loss rose to {loss:.1f} at step {step}, worse than guessing every "
                                        f"token at random ({self.max_loss - 1:.1f}): training diverged. "
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
            _append_metric(self.run_dir, record)
            self.last = record
            update_status(self.run_dir, step=step, max_steps=state.max_steps, first_eval_loss=self.first_eval_loss,
                          eval_loss=_best_eval(state, record), train_loss=record["loss"] or _status_loss(self.run_dir),
                          tokens_trained=record.get("tokens") or read_status(self.run_dir).get("tokens_trained", 0),
                          wall_s=record["elapsed_s"], eta_s=record["eta_s"], examples_seen=self.examples_seen(args, state))
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
            if control.should_evaluate and not last and self.eval_share < 1.0:
                spent = now - self.started
                if self.eval_s + self.last_eval_s > self.eval_share * (spent + self.last_eval_s):
                    control.should_evaluate = False
            if control.should_evaluate:
                self.eval_started = now
            if control.should_save and not last and now - self.last_save < self.save_every_s:
                control.should_save = False
            return control

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self.last_eval_s = time.monotonic() - self.eval_started
            self.eval_s += self.last_eval_s
            loss = (metrics or {}).get("eval_loss")
            best = state.best_metric
            if state.global_step > 0 and loss is not None and (best is None or loss < best):
                control.should_save = True  # load_best_model_at_end needs the best on disk
            return control

        def on_save(self, args, state, control, **kw):
            self.last_save = time.monotonic()

    return RunRecorder, OverheadBudget


def _best_eval(state, record: dict[str, Any]) -> float | None:
    if record.get("eval_loss") is not None:
        best = state.best_metric
        return min(best, record["eval_loss"]) if best is not None else record["eval_loss"]
    return state.best_metric


def _status_loss(run_dir: Path) -> float | None:
    return read_status(run_dir).get("train_loss")


# -- checkpoints ----------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose save finished (trainer_state.json is written last and must parse), oldest first."""
    folder = run_dir / CHECKPOINTS_DIR
    out = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        state = read_json(path / "trainer_state.json")
        weights = any(path.glob("*.safetensors"))
        if isinstance(state, dict) and state.get("global_step") == _checkpoint_step(path) and weights:
            out.append(path)
    return sorted(out, key=_checkpoint_step)


def remove_incomplete_checkpoints(run_dir: Path) -> list[str]:
    """Delete checkpoint folders a kill left half-written, so neither resume nor rotation picks them."""
    folder = run_dir / CHECKPOINTS_DIR
    good = set(complete_checkpoints(run_dir))
    removed = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        if path not in good:
            if is_main_process():
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


# -- the run ------------------------------------------------------------------------------------


def _inherited_lock() -> bool:
    try:
        os.fstat(int(os.environ.get(LOCK_FD_ENV, "")))
        return True
    except (ValueError, OSError):
        return False


def take_machine_lock(fix: str) -> int:
    """Open and lock TUNER_HOME/train.lock without waiting; the caller owns (and closes) the fd.

    Raises TrainingError naming the holder (the text its owner wrote into the file) and `fix`."""
    import fcntl

    fd = os.open(tuner_home() / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise TrainingError(f"Another training run is in progress on this machine ({holder}). {fix}") from None
    return fd


@contextlib.contextmanager
def machine_lock(run_dir: Path) -> Iterator[None]:
    """One training job per machine: an exclusive flock that the kernel frees even on kill -9."""
    if _inherited_lock() or os.environ.get("LOCAL_RANK", "0") != "0":
        yield  # tuner.jobs took the lock and passed it down, or this is an extra process of one launch
        return
    fd = take_machine_lock("Fix: wait for it to finish, or cancel it.")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"run {run_dir.name}, pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _peak_memory_mb(dev: str) -> float:
    import resource

    if dev == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "cannot allocate memory" in text)


def train_run(run_dir: str | Path, resume: bool = False,
              progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the run in this process and return its final status.

    `resume=True` continues an interrupted/failed/cancelled run from its last complete checkpoint.
    `progress`, if given, is called with every metrics record. Never raises for a failed run:
    the returned status says `failed` and `error` says why and what to change (TunerError is
    raised only when the run cannot start at all).
    """
    run_dir = resolve_run(run_dir) if not Path(run_dir).is_dir() else Path(run_dir).resolve()
    cfg = TrainConfig.load(run_dir / CONFIG_FILE)
    status = read_status(run_dir)
    if status.get("status") == "completed":
        raise TrainingError(f"{run_dir.name} is already completed; its result is in {status.get('adapter')}.")
    if resume and status.get("status") == "queued" and not complete_checkpoints(run_dir):
        resume = False  # nothing to resume from: start it
    with machine_lock(run_dir):
        started = time.monotonic()
        update_status(run_dir, status="running", error=None, pid=os.getpid(), pid_started=_proc_start(os.getpid()),
                      started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        dev = "cpu"
        try:
            from tuner.models import device

            dev = device()
            return _train(run_dir, cfg, resume, progress, dev)
        except KeyboardInterrupt:
            return update_status(run_dir, status="cancelled", error="Stopped from the keyboard. Resume to continue.",
                                 pid=None, phase=None)
        except TunerError as exc:
            return update_status(run_dir, status="failed", error=str(exc), pid=None, phase=None)
        except Exception as exc:  # the run fails; the caller (app, CLI) keeps going
            if _is_oom(exc):
                error = "Out of memory. " + OOM_ADVICE.format(batch_size=cfg.batch_size, max_length=cfg.max_length,
                                                              quantization=cfg.quantization.value)
            elif _disk_full(exc, run_dir):
                error = (f"The disk is full ({exc}). Earlier checkpoints and results were kept. "
                         "Fix: free disk space, then resume.")
            else:
                error = f"{type(exc).__name__}: {exc}"
            import traceback

            traceback.print_exc()  # into train.log when run by tuner.jobs
            remove_incomplete_checkpoints(run_dir)
            return update_status(run_dir, status="failed", error=error, pid=None, phase=None,
                                 wall_s=round(read_status(run_dir).get("wall_s") or 0.0, 1),
                                 session_s=round(time.monotonic() - started, 1))
        finally:
            _release_memory(dev)


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


def _release_memory(dev: str) -> None:
    import gc

    gc.collect()
    if dev == "cuda":
        import torch

        torch.cuda.empty_cache()


def _proc_start(pid: int) -> float | None:
    """The process start time, so a recycled pid is never mistaken for the training process."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _load_split(run_dir: Path, name: str, tokenizer, template: str | None, max_length: int):
    path = run_dir / DATA_DIR / name
    rows = read_examples(path) if path.is_file() else []
    return inspect_examples(rows, tokenizer, template, max_length, file=name)


def build_trainer(run_dir: Path, cfg: TrainConfig, dev: str, resume: bool = False,
                  progress: Callable[[dict[str, Any]], None] | None = None):
    """Everything up to `trainer.train()`: data, model, SFTConfig, callbacks. Returns (trainer, context).

    Also used by the benchmark, so the measured recipe is the one users get.
    """
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed

    from datasets import Dataset, disable_progress_bars
    from tuner.chat_template import training_template
    from tuner.models import load_model, load_tokenizer

    _check_data(run_dir)
    update_status(run_dir, phase="loading the model and the data")
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.base_model)
    chat_template = tokenizer.chat_template
    template = training_template(tokenizer) if cfg.assistant_only_loss else None
    train_rows, train_stats = _load_split(run_dir, "train.jsonl", tokenizer, template, cfg.max_length)
    val_rows, val_stats = _load_split(run_dir, "validation.jsonl", tokenizer, template, cfg.max_length)
    warnings = []
    if not val_rows:
        warnings.append("No validation examples: no eval loss, no best-checkpoint selection, no early stopping.")
    dropped = train_stats["dropped"] + val_stats["dropped"]
    if dropped:
        warnings.append(f"{len(dropped)} example(s) dropped: nothing in them to learn from (see `dropped`).")
    data_stats = {"train": {k: v for k, v in train_stats.items() if k != "dropped"},
                  "validation": {k: v for k, v in val_stats.items() if k != "dropped"}}
    update_status(run_dir, data=data_stats, dropped=dropped[:100], warnings=warnings)
    if not train_rows:
        raise DataError("no example is left to train on (see `dropped` in status.json). "
                        "Fix: the examples need assistant replies within max_length.", file="train.jsonl")

    if template is not None:
        tokenizer.chat_template = template  # trl reads {% generation %} markers from the tokenizer's template
    prec = precision(cfg, dev)
    quant = quantization(cfg, dev)
    model = load_model(cfg.base_model, quantization=quant, dtype=prec["weights"], dev=dev)
    if cfg.method is Method.FULL:
        model.requires_grad_(True)
    if quant == Quantization.NF4.value and dev == "cpu":
        keep_4bit_layout_trainable(model)
    n_params = sum(p.numel() for p in model.parameters())
    gc_on = gradient_checkpointing(cfg, dev, n_params)
    attn = attention(dev, max(train_stats["longest"], val_stats["longest"]), packing_mode(cfg, dev))
    if attn != model.config._attn_implementation:
        model.set_attn_implementation(attn)

    offset: dict[str, Any] = {}
    checkpoint = None
    if resume:
        removed = remove_incomplete_checkpoints(run_dir)
        checkpoints = complete_checkpoints(run_dir)
        checkpoint = checkpoints[-1] if checkpoints else None
        kept = _truncate_metrics(run_dir, _checkpoint_step(checkpoint) if checkpoint else 0)
        offset = _offset_from(kept)
        update_status(run_dir, resumed_from=checkpoint.name if checkpoint else None, removed_incomplete=removed)
    elif is_main_process():
        if (run_dir / CHECKPOINTS_DIR).exists():
            shutil.rmtree(run_dir / CHECKPOINTS_DIR)  # a fresh start must not rotate into old checkpoints
        (run_dir / METRICS_FILE).unlink(missing_ok=True)

    args = sft_config(cfg, run_dir, dev, prec, bool(val_rows), gc_on, resume=checkpoint is not None)
    recorder_class, budget_class = _recorder_class()
    recorder = recorder_class(run_dir, offset, bool(val_rows), progress, model.config.get_text_config().vocab_size,
                              eval_share=cfg.eval_share)
    callbacks = [recorder, budget_class(cfg.eval_share, cfg.save_every_s)]
    if cfg.early_stopping_patience > 0 and val_rows:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))

    def as_dataset(rows):
        return Dataset.from_list([{"messages": r["messages"]} for r in rows]) if rows else None

    disable_progress_bars()  # trl's map() bars would flood train.log; tuner reports progress itself
    trainer = _trainer_class()(model=model, args=args, train_dataset=as_dataset(train_rows),
                         eval_dataset=as_dataset(val_rows), processing_class=tokenizer,
                         peft_config=lora_config(cfg) if cfg.method is Method.LORA else None, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl and the progress callback instead
    full_eval = None
    if trainer.eval_dataset is not None and "input_ids" in trainer.eval_dataset.column_names:
        full_eval = trainer.eval_dataset
        trainer.eval_dataset = eval_sample(full_eval, cfg.eval_examples, cfg.seed)
    context = {"full_eval": full_eval, "checkpoint": checkpoint, "recorder": recorder, "chat_template": chat_template, "quantization": quant,
               "data_stats": data_stats, "precision": prec, "has_eval": bool(val_rows)}
    update_status(run_dir, device=dev, precision=prec["name"], precision_reason=_precision_reason(cfg, dev), quantization=quant, gradient_checkpointing=gc_on,
                  attention=attn,
                  batching=packing_mode(cfg, dev), threads=torch.get_num_threads() if dev == "cpu" else None,
                  parameters=n_params, trainable_parameters=sum(p.numel() for p in trainer.model.parameters()
                                                                if p.requires_grad))
    return trainer, context


def eval_sample(dataset, limit: int, seed: int):
    """The validation examples scored during training: all, or a fixed seeded sample of `limit`; in length
    order, since batches of similar length pad least (the order of validation examples means nothing)."""
    import random

    indices = list(range(len(dataset)))
    if 0 < limit < len(indices):
        indices = random.Random(seed).sample(indices, limit)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(sorted(indices, key=lambda i: -lengths[i]))


def keep_4bit_layout_trainable(model) -> int:
    """Stop bitsandbytes repacking NF4 weights for CPU inference during evaluation.

    On CPUs with AVX512-BF16, a bitsandbytes Linear4bit called in eval mode without gradients converts
    its weight to an inference-only layout, and never converts it back: the training steps after the
    first evaluation then run through a kernel with no backward (torch warns "an autograd kernel was
    not registered"), and gradients through the frozen base are wrong. Returns the layers changed.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def fast_lora_casts(model):
    """Let autocast pick the LoRA matmul dtype instead of peft casting every input to the fp32 adapter dtype.

    The adapter keeps fp32 master weights (exact AdamW updates) while its matmuls run in bf16 like
    the base layers; on CPU this removes a copy per LoRA layer per step (measured ~1.2x).
    """
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


@contextlib.contextmanager
def training_context(model, prec: dict[str, Any]) -> Iterator[None]:
    """What `trainer.train()` runs inside: LoRA matmuls in autocast's dtype (under autocast only, where
    the adapter's fp32 weights and the half-precision base meet), and loss on loss positions only."""
    autocast = prec["bf16"] or prec["fp16"]
    with (fast_lora_casts(model) if autocast else contextlib.nullcontext()), loss_positions_only():
        yield


@contextlib.contextmanager
def loss_positions_only() -> Iterator[None]:
    """Let trl's fused LM head score only the positions that carry loss on every device.

    trl scores just those positions where it runs Triton (CUDA/XPU) and every position elsewhere,
    to keep tile shapes fixed for compiling backends (Neuron). Eager CPU has no such concern, and
    the head's fp32 backward over a 49k vocabulary is the largest single cost of a CPU step, so
    scoring prompts and padding for nothing is pure waste. Only the choice of positions changes:
    the kernels (picked in trl.kernels) and the loss are the same.
    """
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        yield
        return
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:  # trl changed: keep its behaviour
        yield
        return
    trl_utils._use_triton = lambda device: original(device) or device.type == "cpu"
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _train(run_dir: Path, cfg: TrainConfig, resume: bool, progress, dev: str) -> dict[str, Any]:
    trainer, ctx = build_trainer(run_dir, cfg, dev, resume, progress)
    checkpoint, recorder = ctx["checkpoint"], ctx["recorder"]
    if checkpoint is not None and _finished(checkpoint):
        # killed after the last step (during the final save): the Trainer, resumed there, would run one
        # step too many, so the result is taken from the checkpoints as they are
        _restore_finished(trainer, run_dir, checkpoint, cfg)
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
        eval_all = trainer.evaluate(eval_dataset=full_eval, metric_key_prefix="eval_all").get("eval_all_loss")
    metrics = read_metrics(run_dir)
    summary = {
        "step": int(trainer.state.global_step),
        "max_steps": int(trainer.state.max_steps),
        "best_step": trainer.state.best_global_step,
        "first_eval_loss": recorder.first_eval_loss,
        "eval_loss": trainer.state.best_metric if ctx["has_eval"] else None,
        "final_eval_loss": _last(metrics, "eval_loss"),
        "first_loss": _first(metrics, "loss"),
        "train_loss": _last(metrics, "loss"),
        "tokens_trained": _last(metrics, "tokens") or 0,
        "early_stopped": trainer.state.global_step < trainer.state.max_steps,
        "quantization": ctx["quantization"],
        "eval_examples": len(scored) if scored is not None else 0,
        # every validation example, scored on the final weights (the same as eval_loss when the sample is all)
        "eval_loss_all": eval_all if eval_all is not None else (trainer.state.best_metric if ctx["has_eval"] else None),
        "examples_seen": int(trainer.state.global_step) * cfg.batch_size * cfg.grad_accum * max(_world_size(), 1),
    }
    out_dir = run_dir / (MODEL_DIR if cfg.method is Method.FULL else ADAPTER_DIR)
    update_status(run_dir, phase="saving and checking the result")
    _save_result(trainer, cfg, run_dir, out_dir, summary, ctx["data_stats"], ctx["precision"]["name"], dev)
    summary["wall_s"] = round(recorder.elapsed(), 1)
    return update_status(run_dir, status="completed", phase="done", error=None, adapter=str(out_dir), pid=None, eta_s=0,
                         peak_memory_mb=_peak_memory_mb(dev),
                         train_runtime_s=round(train_runtime, 1), **summary)


def _finished(checkpoint: Path) -> bool:
    """True if training had ended at this checkpoint (last step reached, or stopped early)."""
    state = read_json(checkpoint / "trainer_state.json", {})
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
    stopped = bool((control.get("args") or {}).get("should_training_stop"))
    return stopped or state.get("global_step", 0) >= state.get("max_steps", math.inf)


def _restore_finished(trainer, run_dir: Path, checkpoint: Path, cfg: TrainConfig) -> None:
    """Load the trainer state and the result weights (the best checkpoint when there is one) from disk."""
    from safetensors.torch import load_file
    from transformers import TrainerState

    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    source = checkpoint
    best = trainer.state.best_model_checkpoint
    if best and (run_dir / CHECKPOINTS_DIR / Path(best).name).is_dir():
        source = run_dir / CHECKPOINTS_DIR / Path(best).name  # found by name: the run folder may have moved
    if cfg.method is Method.LORA:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.model, load_file(str(source / "adapter_model.safetensors")))
    else:
        weights: dict[str, Any] = {}
        for f in sorted(source.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        trainer.model.load_state_dict(weights, strict=False)


def _offset_from(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"elapsed_s": records[-1]["elapsed_s"] if records else 0.0,
            "tokens": _last(records, "tokens") or 0,
            "first_eval_loss": _first(records, "eval_loss")}


def _first(records: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in records if r.get(key) is not None), None)


def _last(records: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def _save_result(trainer, cfg: TrainConfig, run_dir: Path, out_dir: Path, summary: dict[str, Any],
                 data_stats: dict[str, Any], prec: str, dev: str) -> None:
    """Save to a temporary folder, check that it reloads, then rename it into place."""
    tmp = run_dir / f".{out_dir.name}.tmp"
    if not is_main_process():
        trainer.save_model(str(tmp))  # every process takes part (sharded weights are gathered); rank 0 writes
        return
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        trainer.save_model(str(tmp))
        # security: the result holds safetensors and JSON only; training_args.bin is a pickle nobody needs here
        (tmp / "training_args.bin").unlink(missing_ok=True)
        (tmp / "README.md").write_text(model_card(cfg, summary, data_stats, prec, dev, run_dir), encoding="utf-8")
        verify_result(trainer.model, tmp, cfg)
        old = run_dir / f".{out_dir.name}.old"
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_result(model, folder: Path, cfg: TrainConfig) -> None:
    """Reload what was saved and compare it with the trained weights; raise if it does not match.

    For LoRA the adapter is loaded next to the trained one by peft's own loader (no second copy of
    the base model); for full fine-tuning the saved checkpoint is read back tensor by tensor.
    """
    import torch
    from safetensors.torch import load_file

    if _world_size() > 1:  # weights may be sharded across processes: check what was written, not values
        from peft import PeftConfig

        if cfg.method is Method.LORA:
            PeftConfig.from_pretrained(str(folder))
        if not any(load_file(str(f)) for f in folder.glob("*.safetensors")):
            raise TrainingError(f"No weights were written to {folder}.")
        return
    if cfg.method is Method.LORA:
        name = "_reload_check"
        model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        try:
            trained = {k: v for k, v in model.state_dict().items() if ".default." in k and "lora_" in k}
            loaded = {k.replace(f".{name}.", ".default."): v for k, v in model.state_dict().items()
                      if f".{name}." in k}
            if not trained or trained.keys() != loaded.keys():
                raise TrainingError(f"The saved adapter in {folder} does not hold the trained LoRA layers.")
            for key, value in trained.items():
                if not torch.equal(value.float(), loaded[key].float()):
                    raise TrainingError(f"The saved adapter differs from the trained one at {key}.")
        finally:
            model.delete_adapter(name)
            model.set_adapter("default")
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TrainingError(f"No weights were written to {folder}.")
    saved: dict[str, Any] = {}
    for f in files:
        saved.update(load_file(str(f)))
    for key, value in model.state_dict().items():
        if key in saved and not torch.equal(saved[key].float().cpu(), value.float().cpu()):
            raise TrainingError(f"The saved model differs from the trained one at {key}.")


def model_card(cfg: TrainConfig, summary: dict[str, Any], data_stats: dict[str, Any], prec: str, dev: str,
               run_dir: Path) -> str:
    from tuner import __version__
    from tuner.models import DEFAULT_HUB_ID, is_default

    base = DEFAULT_HUB_ID + " (embedded copy)" if is_default(cfg.base_model) else cfg.base_model
    sources = read_json(run_dir / DATA_DIR / SOURCES_FILE, {})
    tr, va = data_stats["train"], data_stats["validation"]

    def fmt(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, float) else ("n/a" if x is None else str(x))

    kind = "LoRA adapter" if cfg.method is Method.LORA else "fully fine-tuned model"
    quant = ""
    if cfg.method is Method.LORA:
        quant = " (base in 4-bit NF4: QLoRA)" if summary.get("quantization") == "nf4" else f" (base in {prec})"
    lines = [
        "---", f"base_model: {DEFAULT_HUB_ID if is_default(cfg.base_model) else cfg.base_model}",
        "library_name: peft" if cfg.method is Method.LORA else "library_name: transformers",
        "tags: [tuner, trl, sft" + (", lora]" if cfg.method is Method.LORA else "]"), "---", "",
        f"# {run_dir.name}", "",
        f"A {kind} trained by tuner {__version__} with trl's SFTTrainer on {base}{quant}.", "",
        "## Results", "",
        "| | value |", "|---|---|",
        f"| validation loss before training ({summary.get('eval_examples')} examples) | "
        f"{fmt(summary.get('first_eval_loss'))} |",
        f"| validation loss of these weights (best, same examples) | {fmt(summary.get('eval_loss'))} |",
        f"| validation loss on all {va['examples']} validation examples | {fmt(summary.get('eval_loss_all'))} |",
        f"| first / final training loss | {fmt(summary.get('first_loss'))} / {fmt(summary.get('train_loss'))} |",
        f"| steps (best step) | {summary.get('step')} of {summary.get('max_steps')} ({summary.get('best_step')}) |",
        f"| tokens trained | {summary.get('tokens_trained')} |",
        f"| device, precision | {dev}, {prec} |", "",
        "## Data", "",
        f"- training: {tr['examples']} conversations, {tr['tokens']} tokens, {tr['trained_tokens']} of them in "
        f"assistant replies (the loss is on those{'' if cfg.assistant_only_loss else ' and every other token'})",
        f"- validation: {va['examples']} conversations, {va['tokens']} tokens",
        f"- truncated to {cfg.max_length} tokens: {tr['truncated'] + va['truncated']}",
    ]
    for name, info in sources.items():
        lines.append(f"- `{name}` sha256 `{info['sha256']}`")
    lines += ["", "## Settings", "", "```yaml"]
    lines += [f"{k}: {v}" for k, v in cfg.to_dict().items()]
    lines += ["```", "", "Use it with peft:" if cfg.method is Method.LORA else "Use it with transformers:", "",
              "```python"]
    if cfg.method is Method.LORA:
        lines += ["from peft import AutoPeftModelForCausalLM",
                  "model = AutoPeftModelForCausalLM.from_pretrained('adapter/')"]
    else:
        lines += ["from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained('model/')"]
    lines += ["```", ""]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="Folder with train.jsonl and validation.jsonl (from `convert`).")
    parser.add_argument("--base-model", help="Base model: 'default', a local folder or a Hub id.")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="Start from a preset (quick, balanced, thorough).")
    parser.add_argument("--config", help="A TrainConfig as YAML/JSON (a run's config.yaml re-creates that run).")
    parser.add_argument("--quantization", choices=[q.value for q in Quantization])
    parser.add_argument("--method", choices=[m.value for m in Method])
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, help="Passes over the training set.")
    steps.add_argument("--max-steps", type=int, help="Optimizer steps (overrides epochs).")
    parser.add_argument("--out", help="Run folder to create (default: a new folder under the runs directory).")
    parser.add_argument("--resume", metavar="RUN_DIR", help="Continue an interrupted run from its last checkpoint.")
    parser.add_argument("--run", metavar="RUN_DIR", help=argparse.SUPPRESS)  # a prepared run, used by tuner.jobs
    parser.add_argument("--json", action="store_true", help="Print the final status as one JSON object.")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {"base_model": args.base_model, "quantization": args.quantization, "method": args.method,
                 "num_epochs": args.epochs, "max_steps": args.max_steps}
    if args.epochs is not None:
        overrides["max_steps"] = -1
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.config:
        values = TrainConfig.load(args.config).to_dict()
        values.update(overrides)
        return TrainConfig.from_dict(values)
    if args.method == Method.FULL.value and args.quantization is None:
        overrides["quantization"] = Quantization.NONE.value  # full fine-tuning cannot train 4-bit weights
    if args.preset:
        return TrainConfig.from_preset(args.preset, **overrides)
    return TrainConfig.from_dict(overrides)


def _progress_printer(json_mode: bool) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
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


def quiet_threads_env(env: dict[str, str] | os._Environ = os.environ) -> None:
    """OpenMP threads that sleep instead of spin while waiting: on a small shared CPU (the app, a chat, a
    second process) spinning threads stall each other; measured 8x slower steps with 2 cores busy.
    Takes effect only before torch is imported."""
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def quiet_library_noise() -> None:
    """Keep train.log about the run: silence messages that are harmless and that no user can act on."""
    import logging
    import warnings

    # bitsandbytes looks for an optional `kernels` package for its CPU 4-bit matmul and falls back without it
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # transformers' renames (gradient -> activation checkpointing) that trl and peft still call by the old name
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars in a log file


def cli(args: argparse.Namespace) -> int:
    quiet_threads_env()
    quiet_library_noise()
    if args.resume or args.run:
        run_dir = resolve_run(args.resume or args.run)
        resume = bool(args.resume)
    else:
        if not args.data:
            raise TunerError("Give --data DIR (the folder `convert` wrote), or --resume RUN_DIR.")
        cfg = config_from_args(args)
        resume = False
        if _world_size() > 1:  # accelerate launch / torchrun: rank 0 prepares, the others join its folder
            if not args.out:
                raise TunerError("Under a multi-process launch give --out RUN_DIR, so every process uses one run.")
            run_dir = Path(args.out).expanduser().resolve()
            if is_main_process():
                prepare_run(cfg, args.data, run_dir)
            else:
                deadline = time.monotonic() + 600
                while not (run_dir / STATUS_FILE).is_file() and time.monotonic() < deadline:
                    time.sleep(0.5)
        else:
            run_dir = prepare_run(cfg, args.data, args.out)
        if not args.json:
            print(f"run folder: {run_dir}", file=sys.stderr)
    update, close = _progress_printer(args.json)
    try:
        status = train_run(run_dir, resume=resume, progress=update)
    finally:
        close()
    if args.json:
        keys = ("status", "error", "adapter", "first_eval_loss", "eval_loss", "train_loss", "step", "max_steps",
                "tokens_trained", "wall_s", "peak_memory_mb", "device", "precision")
        print(json.dumps({"run": str(run_dir), **{k: status.get(k) for k in keys}}))
    else:
        line = f"{status['status']}: {run_dir}"
        if status.get("error"):
            line += f"\n{status['error']}"
        elif status.get("adapter"):
            line += (f"\nresult: {status['adapter']}\neval loss {status.get('first_eval_loss')} -> "
                     f"{status.get('eval_loss')} in {status.get('step')} steps, {status.get('wall_s')} s")
        print(line, file=sys.stderr)
    return 0 if status["status"] == "completed" else 1
