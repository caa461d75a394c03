"""A run folder: the one module that knows its layout, and the files that readers poll.

    runs/<id>/
      config.yaml          the TrainConfig; the run is re-created from it alone
      data/                train.jsonl, validation.jsonl (+ report.json, canaries.json) copied at prepare time,
                           sources.json with their sha256, sizes and where they came from
      status.json          queued|running|completed|failed|cancelled|interrupted, phase, losses, step, pid
      metrics.jsonl        one JSON object a line: step, loss, eval_loss, learning_rate, tokens_per_s, ...
      train.log            the training process's output (when started by tuner.jobs)
      checkpoints/checkpoint-<step>/   the Trainer's own format; resume uses resume_from_checkpoint
      adapter/             final LoRA adapter + tokenizer + README.md model card (method lora)
      model/               final weights + tokenizer + README.md (method full)
      eval.json            the evaluation (tuner.evaluate): prompting vs retrieval vs tuning, forgetting
      feedback.jsonl       reviewers' judgements from the playground
      owner.json           who made the run and their teams then (tuner.auth); none on runs made before

Every file a reader polls is written atomically (temp file + os.replace), so a kill at any moment
never leaves a half-written file. Light module: no torch, no transformers. Other modules name a
run's files through `Run` and never spell a file name themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.auth import machine_user
from tuner.config import TrainConfig
from tuner.errors import DataError, MachineBusy, RunNotFound, TrainingError
from tuner.messages import read_examples
from tuner.paths import check_run_id, new_run_id, runs_dir, tuner_home

STATUSES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
ACTIVE = ("queued", "running")
RESUMABLE = ("interrupted", "failed", "cancelled")
DATA_FILES = ("train.jsonl", "validation.jsonl", "report.json", "canaries.json")
LOCK_FILE = "train.lock"  # in TUNER_HOME: one training job per machine
LOCK_FD_ENV = "TUNER_TRAIN_LOCK_FD"  # set by tuner.jobs: the child inherits the machine-wide lock


@dataclass(frozen=True)
class Run:
    """A run folder's paths. `Run(path)` for a folder you have; `resolve(id_or_path)` for user input."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log_file(self) -> Path:
        return self.path / "train.log"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def sources_file(self) -> Path:
        return self.data_dir / "sources.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def eval_file(self) -> Path:
        return self.path / "eval.json"

    @property
    def eval_report(self) -> Path:
        return self.path / "eval.md"

    @property
    def feedback_file(self) -> Path:
        return self.path / "feedback.jsonl"

    @property
    def owner_file(self) -> Path:
        return self.path / "owner.json"

    def owner(self) -> dict[str, Any] | None:
        """{"name", "teams"}: who made the run and the teams it belongs to; None for a run made before owners
        were recorded (tuner.auth decides who sees those)."""
        value = read_json(self.owner_file)
        return value if isinstance(value, dict) and isinstance(value.get("name"), str) else None

    def set_owner(self, owner: dict[str, Any]) -> None:
        """Record the run's owner ({"name", "teams"}), written once when the run is made."""
        record = {"name": str(owner["name"]), "teams": [str(t) for t in owner.get("teams") or ()]}
        if is_main_process():
            write_json_atomic(self.owner_file, record)

    @property
    def canaries_file(self) -> Path:
        """The canaries the converter planted in train.jsonl (--canaries N), for the memorisation check."""
        return self.data_dir / "canaries.json"

    @property
    def preferences_file(self) -> Path:
        """A preference run's pairs (trl's format), copied into its data folder at prepare time."""
        return self.data_dir / "preferences.jsonl"

    def data_file(self, name: str) -> Path:
        """One of DATA_FILES in the run's copy of its data."""
        return self.data_dir / name

    def result_dir(self) -> Path | None:
        """The trained result: adapter/ (LoRA) or model/ (full fine-tuning), if the run completed."""
        return next((d for d in (self.adapter_dir, self.model_dir) if d.is_dir()), None)

    def exists(self) -> bool:
        return self.config_file.is_file()

    def config(self) -> TrainConfig:
        return TrainConfig.load(self.config_file)

    def config_values(self) -> dict[str, Any]:
        """config.yaml as a plain mapping, {} when damaged: for listings that must not fail on one bad run."""
        import yaml

        try:
            values = yaml.safe_load(self.config_file.read_text())
        except (OSError, ValueError):
            return {}
        return values if isinstance(values, dict) else {}

    def status(self) -> dict[str, Any]:
        return read_status(self.path)

    def update_status(self, **fields: Any) -> dict[str, Any]:
        return update_status(self.path, **fields)

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def sources(self) -> dict[str, Any]:
        return read_json_object(self.sources_file)

    def data_report(self) -> dict[str, Any]:
        """The converter's report.json of the run's data; {} when the data did not come through the converter."""
        return read_json_object(self.data_file("report.json"))


def resolve(run: str | Path) -> Run:
    """Turn a run id, or a path to a run folder, into its Run.

    A bare id is looked up under `runs_dir()` only (security: a run id is one plain folder name).
    A path (from the CLI, or a Path the app holds) must exist and hold a config.yaml.
    Raises RunNotFound otherwise.
    """
    run_s = str(run)
    if "\x00" in run_s:  # the OS would refuse it with a ValueError, not as a missing run
        raise RunNotFound(f"{run_s!r} is not a valid run id or run folder.")
    if isinstance(run, Path) or "/" in run_s or os.sep in run_s:
        try:
            found = Run(Path(run_s).expanduser().resolve())
        except (OSError, ValueError):
            raise RunNotFound(f"'{run_s[:100]}' is not a run.") from None
        if not found.exists():
            raise RunNotFound(f"{run_s} is not a run folder (no config.yaml in it).")
        return found
    found = Run(runs_dir() / check_run_id(run_s))
    if not found.path.is_dir():
        raise RunNotFound(f"No run named '{run_s}' in {runs_dir()}.")
    return found


def all_runs() -> list[Run]:
    """Every run folder under runs_dir() (in no order)."""
    return [Run(p) for p in runs_dir().iterdir() if p.is_dir() and Run(p).exists()]


# -- files that readers poll ----------------------------------------------------------------------

def is_main_process() -> bool:
    """False in the extra processes of `accelerate launch` / torchrun: only rank 0 writes the run's files."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
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
    status = read_json(Run(Path(run_dir)).status_file)
    return status if isinstance(status, dict) else {"status": "unknown", "error": "status.json is missing or damaged"}


def has_result(status: dict[str, Any]) -> bool:
    """Whether the run's result can be served: completed, or saved and checked, which comes before the run's
    voice check (tuner.train.run); so a run can be chatted with while its verdict is worked out, and one
    stopped or failed during that check keeps a usable result."""
    return status.get("status") == "completed" or bool(status.get("saved_at") and status.get("adapter"))


def update_status(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into status.json (atomically) and return the new status."""
    status = read_status(run_dir)
    if status.get("status") == "unknown":
        status = {}
    status.update(fields)
    status["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if is_main_process():
        write_json_atomic(Run(Path(run_dir)).status_file, status)
    return status


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of metrics.jsonl; a torn last line (kill -9 while appending) is skipped."""
    path = Run(Path(run_dir)).metrics_file
    out: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    out.append(record)
    return out


def append_metric(run_dir: Path, record: dict[str, Any]) -> None:
    if not is_main_process():
        return
    with open(Run(run_dir).metrics_file, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the records up to `last_step` (the checkpoint a resume starts from), so the curve stays continuous."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    if not is_main_process():
        return kept
    tmp = run_dir / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, Run(run_dir).metrics_file)
    return kept


# -- creating a run -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_run(cfg: TrainConfig, data_dir: str | Path, run_dir: str | Path | None = None,
                owner: dict[str, Any] | None = None) -> Path:
    """Create a run folder: config.yaml, a copy of the data with sha256 hashes, its owner ({"name", "teams"},
    tuner.auth.User.owner_record; the machine's user when not given), and status 'queued'."""
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
    if (Run(run_dir).config_file).exists():
        raise TrainingError(f"{run_dir} already holds a run. Fix: pick another --out, or resume it with "
                            f"`python -m tuner train --resume {run_dir}`.")
    Run(run_dir).data_dir.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name in DATA_FILES:
        src = data_dir / name
        if src.is_file():
            shutil.copyfile(src, Run(run_dir).data_file(name))
            sources[name] = {"sha256": sha256_file(src), "bytes": src.stat().st_size, "examples": counts.get(name),
                             "source": str(src.resolve())}
    write_json_atomic(Run(run_dir).sources_file, sources)
    Run(run_dir).set_owner(owner or {"name": machine_user(), "teams": []})
    cfg.save(Run(run_dir).config_file)
    update_status(run_dir, status="queued", error=None, step=0, max_steps=None, adapter=None,
                  first_eval_loss=None, eval_loss=None, train_loss=None, tokens_trained=0, wall_s=0.0,
                  peak_memory_mb=None, pid=None, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return run_dir


def check_data(run_dir: Path) -> None:
    """The copied data must still be what prepare_run hashed (a changed file would silently change the run)."""
    sources = read_json(Run(run_dir).sources_file, {})
    for name, info in sources.items():
        path = Run(run_dir).data_file(name)
        if not path.is_file() or sha256_file(path) != info.get("sha256"):
            raise DataError("changed or missing since the run was prepared (sha256 differs). "
                            "Fix: start a new run from the data.", file=str(path))


# -- checkpoints ----------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose save finished (trainer_state.json is written last and must parse), oldest first."""
    folder = Run(run_dir).checkpoints_dir
    out = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        state = read_json(path / "trainer_state.json")
        weights = any(path.glob("*.safetensors"))
        if isinstance(state, dict) and state.get("global_step") == checkpoint_step(path) and weights:
            out.append(path)
    return sorted(out, key=checkpoint_step)


def remove_incomplete_checkpoints(run_dir: Path) -> list[str]:
    """Delete checkpoint folders a kill left half-written, so neither resume nor rotation picks them."""
    folder = Run(run_dir).checkpoints_dir
    good = set(complete_checkpoints(run_dir))
    removed = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        if path not in good:
            if is_main_process():
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


# -- the machine lock -----------------------------------------------------------------------------


def _inherited_lock() -> bool:
    try:
        os.fstat(int(os.environ.get(LOCK_FD_ENV, "")))
        return True
    except (ValueError, OSError):
        return False


def take_machine_lock(fix: str) -> int:
    """Open and lock TUNER_HOME/train.lock without waiting; the caller owns (and closes) the fd.

    Raises MachineBusy (a TrainingError) naming the holder (the text its owner wrote into the file) and `fix`."""
    import fcntl

    fd = os.open(tuner_home() / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise MachineBusy(f"Another training run is in progress on this machine ({holder}). {fix}") from None
    return fd


def release_inherited_lock() -> None:
    """Close the machine lock a job process inherited from tuner.jobs, so that the next queued run can
    start while this process finishes exiting (the kernel would free it at exit anyway)."""
    if _inherited_lock():
        os.close(int(os.environ.pop(LOCK_FD_ENV)))
    os.environ.pop(LOCK_FD_ENV, None)


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
