"""Training jobs: each run trains in its own process, which the app starts, watches, cancels and lists.

The job process is `python -m tuner train --run|--resume RUN_DIR` in a new session (its own
process group), with stdout/stderr in `RUN_DIR/train.log`. It reports only through files
(status.json, metrics.jsonl), so the app stays responsive, a crash cannot take the app down,
and an app restart loses nothing.

One training job per machine: `start` takes an exclusive lock (`TUNER_HOME/train.lock`) and
hands it to the job process, which holds it until it exits (the kernel frees it even on
kill -9). `start` itself refuses while a job runs (MachineBusy); `submit` queues instead:

    submit(run, owner)  -> the run waits in TUNER_HOME/queue.json (tuner.jobqueue), then dispatch()
    dispatch()          -> if the machine is free, start the head of the queue; else nothing

dispatch is called by whoever may see the machine free: `submit` itself, a job process as it
exits (tuner.train.cli), `cancel`, the app's timer on every open page, the app's start (after
`reconcile`) and a command waiting in line. Two dispatchers never start two jobs: they take the
queue's lock in turn, and the first one's job holds the machine lock when the second looks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner import jobqueue
from tuner.cli import quiet_threads_env
from tuner.config import TrainConfig
from tuner.errors import MachineBusy, NotYourRun, RunNotFound, TrainingError, TunerError
from tuner.paths import check_run_id, runs_dir, tuner_home
from tuner.runs import (
    ACTIVE,
    LOCK_FD_ENV,
    LOCK_FILE,
    RESUMABLE,
    Run,
    all_runs,
    complete_checkpoints,
    has_result,
    read_json_object,
    resolve,
    take_machine_lock,
    update_status,
)
from tuner.runs import read_metrics as _read_metrics
from tuner.runs import read_status as _read_status

ROOT = Path(__file__).resolve().parent.parent
CANCEL_GRACE_S = 5.0  # SIGTERM first, SIGKILL after this


@dataclass
class Job:
    """A training process started by `start`. Poll files (read_status) rather than this object."""

    run_dir: Path
    pid: int
    process: subprocess.Popen | None = field(default=None, repr=False)

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.process.poll() if self.process else (None if pid_alive(self.pid) else 0)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the process to end and return the run's final status."""
        if self.process is not None:
            self.process.wait(timeout)
        else:
            deadline = None if timeout is None else time.monotonic() + timeout
            while pid_alive(self.pid):
                if deadline is not None and time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
                time.sleep(0.2)
        return read_status(self.run_dir)


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    """True if `pid` runs (not a zombie) and, when `started` is given, is the same process that started then."""
    if not pid:
        return False
    import psutil

    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            if _threads_left(int(pid)):
                # a killed multi-threaded process: the leader is a zombie while its other threads still
                # exit, and they hold its open files (the training lock) until the last one is gone
                return True
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(int(pid), os.WNOHANG)  # reap our own child
            return False
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _threads_left(pid: int) -> bool:
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def _run_path(run: str | Path) -> Path:
    """A run folder from a Path (the app's, the bench's) or an id / CLI path (checked by runs.resolve)."""
    return resolve(run).path


def _stale(status: dict[str, Any]) -> bool:
    return status.get("status") in ACTIVE and status.get("pid") is not None and not pid_alive(
        status.get("pid"), status.get("pid_started"))


def _mark_interrupted(run_dir: Path, status: dict[str, Any]) -> dict[str, Any]:
    step = status.get("step") or 0
    checkpoints = complete_checkpoints(run_dir)
    resume_at = checkpoints[-1].name if checkpoints else "the start"
    log = " Its output is in train.log." if Run(run_dir).log_file.is_file() else ""
    return update_status(run_dir, status="interrupted", pid=None, error=(
        f"The training process stopped at step {step} without finishing (app restart, kill, or the system "
        f"ran out of memory). Resume continues from {resume_at}.{log}"))


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """The run's status; a run left 'running' by a process that no longer exists reads as 'interrupted'."""
    run_dir = _run_path(run_dir)
    status = _read_status(run_dir)
    if _stale(status):
        status = _mark_interrupted(run_dir, status)
    return status


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of records (step, loss, eval_loss, learning_rate, tokens_per_s, elapsed_s, eta_s)."""
    return _read_metrics(_run_path(run_dir))


def active_job() -> dict[str, Any] | None:
    """The run holding the machine's training lock, as {run_dir, pid}, or None."""
    import fcntl

    path = tuner_home() / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return {"holder": os.pread(fd, 4096, 0).decode(errors="replace").strip()}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _startable(run_dir: Path, resume: bool) -> bool:
    """Whether the run starts as a resume; raises TrainingError if it runs already or is completed."""
    status = read_status(run_dir)
    state = status.get("status")
    if state == "running" or (state == "queued" and pid_alive(status.get("pid"), status.get("pid_started"))):
        raise TrainingError(f"{run_dir.name} is already running (pid {status.get('pid')}).")
    if state == "completed":
        raise TrainingError(f"{run_dir.name} is already completed; start a new run to train again.")
    if state == "queued" and resume and not complete_checkpoints(run_dir):
        resume = False
    if state in RESUMABLE and not resume:
        resume = True  # a stopped run only continues; a fresh start is a new run
    return resume


def start(run_dir: str | Path, resume: bool = False) -> Job:
    """Start training a prepared run (or resume one) in a new process group; returns at once.

    Raises MachineBusy (a TrainingError) if another training job runs on this machine (`submit` queues
    instead), TrainingError if the run is already running or completed. A run that waited in the queue
    leaves it.
    """
    run_dir = _run_path(run_dir)
    resume = _startable(run_dir, resume)
    fd = take_machine_lock("One job runs at a time: wait for it to finish or cancel it, then start this one.")
    job = _launch(run_dir, resume, fd)
    with jobqueue.locked() as queue:
        if (i := jobqueue.index_of(queue, run_dir)) is not None:
            queue.pop(i)
    return job


def _launch(run_dir: Path, resume: bool, fd: int) -> Job:
    """Start the job process, handing it the machine lock `fd` (closed here: the child holds it from then on)."""
    try:
        env = {**os.environ, LOCK_FD_ENV: str(fd), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        quiet_threads_env(env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "tuner", "train", "--resume" if resume else "--run", str(run_dir)]
        os.ftruncate(fd, 0)  # who holds the machine, for the queue's view (the pid follows)
        os.pwrite(fd, f"run {run_dir.name}, starting".encode(), 0)
        update_status(run_dir, status="queued", pid=None, pid_started=None, error=None)
        with open(Run(run_dir).log_file, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd[2:])}\n".encode())
            log.flush()
            # its own session: cancel signals the whole tree, and the app's own signals do not reach it
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=str(ROOT), pass_fds=(fd,), start_new_session=True)
        # reap it when it exits, so a finished job does not stay a zombie under the app until the app exits
        threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"run {run_dir.name}, pid {proc.pid}".encode(), 0)
        if _read_status(run_dir).get("pid") is None:  # unless the job already reported itself running
            update_status(run_dir, pid=proc.pid, pid_started=_create_time(proc.pid))
    finally:
        os.close(fd)  # the child holds the lock from here on
    return Job(run_dir=run_dir, pid=proc.pid, process=proc)


def start_new(prepare: Callable[[], Path], owner: str = "") -> Path:
    """Prepare a new run folder with `prepare()` and submit it: it starts now if the machine is free, else it
    waits in the queue (its status says 'queued'; `place` says where). The folder is removed again if it
    cannot be submitted."""
    run_dir = Path(prepare())
    try:
        submit(run_dir, owner=owner)
    except TunerError:
        delete_run(run_dir.name)  # leave no never-started run behind
        raise
    return run_dir


# -- the queue -----------------------------------------------------------------------------------------


def everyone(owner: str) -> bool:
    """The default `visible`: every viewer may see every owner's name and run (one team, or no sign-in)."""
    return True


def may_cancel(owner: str | None, user: str | None) -> bool:
    """Whether `user` may cancel a job that `owner` started: their own, or one nobody signed (started without
    a sign-in, or before owners were recorded). The lead's team rules replace this name check."""
    return not owner or owner == (user or "")


def owner_of(run_dir: str | Path) -> str:
    """Who started or queued the run ("" when nobody was signed in), as its status records it."""
    return str(_read_status(_run_path(run_dir)).get("owner") or "")


def _estimate_s(run_dir: Path) -> float | None:
    """The run's expected time (estimate), for the queue's 'time left'; None when it cannot be estimated."""
    run = Run(run_dir)
    if isinstance(_read_status(run_dir).get("preference"), dict):
        return None  # a preference run's steps and data are not an SFT run's
    try:
        return estimate(run.config(), run.data_dir, time_only=True).get("time_s")
    except Exception:  # noqa: BLE001 - an estimate must never keep a run out of the queue
        return None


def submit(run_dir: str | Path, owner: str = "", resume: bool = False) -> dict[str, Any] | None:
    """Put a prepared (or stopped: it will resume) run in the machine's queue and start the queue's head if the
    machine is free. Returns the run's place in the queue (see `place`), or None when it started at once.

    Raises TrainingError if the run is already running or completed. Submitting a run that waits already
    keeps its place; a run that has an owner keeps it."""
    run_dir = _run_path(run_dir)
    resume = _startable(run_dir, resume)
    owner = str(_read_status(run_dir).get("owner") or owner)  # a run resumed by anyone stays its owner's
    estimate_s = _estimate_s(run_dir)
    now = time.time()
    with jobqueue.locked() as queue:
        if jobqueue.index_of(queue, run_dir) is None:
            queue.append(jobqueue.new_entry(run_dir, owner, now, resume, estimate_s))
            update_status(run_dir, status="queued", pid=None, pid_started=None, error=None, owner=owner,
                          queued_at=now, estimate_s=estimate_s)
    dispatch()
    return place(run_dir)


def _waiting(entry: dict[str, Any]) -> bool:
    """Whether a queue entry still waits: its run exists, is 'queued' and no process was started for it."""
    path = Path(entry["path"])
    if not Run(path).exists():
        return False  # deleted
    status = read_status(path)  # a launched job that died before reporting reads as interrupted here
    return status.get("status") == "queued" and status.get("pid") is None


def dispatch() -> Job | None:
    """If the machine is free, start the run at the head of the queue; the Job, or None (nothing waits, or
    the machine is busy). Safe to call from any process at any time: under the queue's lock, only a
    dispatcher that holds the machine lock starts anything, and each started run leaves the queue."""
    if not jobqueue.entries():  # the common case, every tick of every open page: no lock, one small read
        return None
    with jobqueue.locked() as queue:
        queue[:] = [e for e in queue if _waiting(e)]  # cancelled, deleted or started by someone else
        while queue:
            run_dir = Path(queue[0]["path"])
            try:
                resume = _startable(run_dir, bool(queue[0].get("resume")))
                fd = take_machine_lock("")
            except MachineBusy:
                return None
            except TunerError as exc:  # this run cannot start (it says why); the next one may
                queue.pop(0)
                update_status(run_dir, status="failed", pid=None, error=f"It could not start from the queue: {exc}")
                continue
            queue.pop(0)
            try:
                return _launch(run_dir, resume, fd)
            except OSError as exc:
                update_status(run_dir, status="failed", pid=None, error=f"It could not start from the queue: {exc}")
    return None


def hand_over() -> Job | None:
    """A job process about to exit: release the machine and start the next queued run (never raises)."""
    from tuner.runs import release_inherited_lock

    try:
        release_inherited_lock()
        return dispatch()
    except Exception:  # noqa: BLE001 - the app's timer and its next start dispatch too
        return None


def _running() -> dict[str, Any] | None:
    """The job that holds the machine, as its run's status (with `path`), or None when the machine is free.
    A holder that is not a run under runs_dir (another TUNER_HOME's CLI run elsewhere) is {"path": None}."""
    holder = active_job()
    if holder is None:
        return None
    text = str(holder.get("holder") or "")
    run_id = text[4:].split(",")[0] if text.startswith("run ") else ""
    with contextlib.suppress(TunerError):
        run = Run(runs_dir() / check_run_id(run_id))
        if run.exists():
            return {**read_status(run.path), "path": str(run.path), "run": run.id}
    return {"path": None, "run": run_id or None, "status": "running"}


def _left_s(status: dict[str, Any], now: float) -> float | None:
    """Seconds the running job has left: its own estimate less its time so far, or its trainer's latest time
    left for the part it is in, whichever is longer; None when neither is known or both have run out (a job
    past its estimate ends at a time nobody knows: never "0 s left")."""
    from tuner import progress

    found = []
    if isinstance(status.get("estimate_s"), (int, float)):
        so_far = progress.elapsed(status, now)
        found.append(float(status["estimate_s"]) - (so_far or 0.0))
    if (left := progress.time_left(status, now)) is not None:
        found.append(left)
    return max(found) if found and max(found) >= 1.0 else None


def queue_rows(visible: Callable[[str], bool] = everyone, now: float | None = None) -> list[dict[str, Any]]:
    """The machine's queue as a viewer may see it: the running job (position 0) then the waiting runs
    (1, 2, ...), each {position, run, owner, state ("training" or "waiting"), visible, since (seconds since
    the epoch: started, or queued), time_left_s, starts_in_s}.

    `visible(owner)` says whether the viewer may see that owner's runs; when not, the row's owner reads
    "another team" and its run id is None. `time_left_s`: the running job's time left, a waiting run's
    estimated length; `starts_in_s`: when a waiting run should start (None when a time ahead is unknown)."""
    now = now or time.time()
    rows: list[dict[str, Any]] = []
    clock: float | None = 0.0
    running = _running()
    if running is not None:
        owner = str(running.get("owner") or "")
        left = _left_s(running, now) if running.get("path") else None
        seen = visible(owner)
        rows.append({"position": 0, "run": running.get("run") if seen else None,
                     "owner": owner if seen else "another team", "state": "training", "visible": seen,
                     "since": _started_at(running), "time_left_s": left, "starts_in_s": 0.0})
        clock = left
    for i, entry in enumerate(e for e in jobqueue.entries() if _waiting(e)):
        owner = str(entry.get("owner") or "")
        seen = visible(owner)
        length = entry.get("estimate_s")
        rows.append({"position": i + 1, "run": entry["run"] if seen else None,
                     "owner": owner if seen else "another team", "state": "waiting", "visible": seen,
                     "since": entry.get("queued_at"), "time_left_s": length, "starts_in_s": clock})
        clock = clock + length if clock is not None and isinstance(length, (int, float)) else None
    return rows


def _started_at(status: dict[str, Any]) -> float | None:
    from tuner import progress

    began = status.get("wait_from")
    return float(began) if isinstance(began, (int, float)) else progress._epoch(status.get("started_at"))


def place(run_dir: str | Path, visible: Callable[[str], bool] = everyone) -> dict[str, Any] | None:
    """Where a waiting run stands: {position (1 = next), ahead: the rows before it (queue_rows), starts_in_s};
    None when it does not wait in the queue."""
    run_dir = _run_path(run_dir)
    rows = queue_rows(lambda owner: True)
    mine = next((r for r in rows if r["state"] == "waiting" and r["run"] == run_dir.name), None)
    if mine is None:
        return None
    ahead = [r for r in queue_rows(visible) if r["position"] < mine["position"]]
    return {"position": mine["position"], "ahead": ahead, "starts_in_s": mine["starts_in_s"]}


def whose(row: dict[str, Any]) -> str:
    """A queue row's run in words: "alice's run", "another team's run", "run run-2026..." (no owner)."""
    if not row["visible"]:
        return "another team's run"
    return f"{row['owner']}'s run" if row["owner"] else f"run {row['run'] or '(outside this app)'}"


def queue_sentence(run_dir: str | Path, visible: Callable[[str], bool] = everyone) -> str:
    """The words for a waiting run: "Queued: 2nd in line, behind alice's run (training, about 4 min left) and
    bob's run (waiting, about 3 min). It starts by itself when the machine frees, in about 7 min."
    "" when the run does not wait."""
    from tuner.progress import fmt_duration

    where = place(run_dir, visible)
    if where is None:
        return ""
    parts = []
    for row in where["ahead"]:
        if row["state"] == "training":
            left = f", about {fmt_duration(row['time_left_s'])} left" if row["time_left_s"] is not None else ""
            parts.append(f"{whose(row)} (training{left})")
        else:
            took = f", about {fmt_duration(row['time_left_s'])}" if row["time_left_s"] is not None else ""
            parts.append(f"{whose(row)} (waiting{took})")
    behind = (" behind " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])) if parts \
        else ""
    when = f", in about {fmt_duration(where['starts_in_s'])}" if where["starts_in_s"] is not None else ""
    return f"Queued: {jobqueue.ordinal(where['position'])} in line{behind}. It starts by itself when the machine frees{when}."


def _create_time(pid: int) -> float | None:
    import psutil

    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).create_time()
    return None


def cancel(run_dir: str | Path, grace_s: float = CANCEL_GRACE_S, user: str | None = None,
           visible: Callable[[str], bool] = everyone, dispatch_next: bool = True) -> dict[str, Any]:
    """Stop a queued or running job: a waiting one leaves the queue; a running one gets SIGTERM to its process
    group, SIGKILL after `grace_s`; then the next queued run starts (unless `dispatch_next` is False).

    The status becomes 'cancelled' (resumable from its last checkpoint). A run that is not active is left as
    it is. With `user` (the page's signed-in name), only a job `may_cancel` allows is stopped: others raise
    NotYourRun, naming the owner only when `visible(owner)`. Returns the status.
    """
    run_dir = _run_path(run_dir)
    status = _read_status(run_dir)
    owner = str(status.get("owner") or "")
    if user is not None and status.get("status") in ACTIVE and not may_cancel(owner, user):
        who = owner if visible(owner) else "someone on another team"
        raise NotYourRun(f"{run_dir.name} was started by {who}: only they can cancel it. Your own runs have a "
                         "Cancel button when you pick them.")
    with jobqueue.locked() as queue:
        waited = (i := jobqueue.index_of(queue, run_dir)) is not None and queue.pop(i) is not None
    status = _read_status(run_dir)
    if status.get("status") not in ACTIVE:
        return status
    pid = status.get("pid")
    if waited and not pid:
        return update_status(run_dir, status="cancelled", pid=None, eta_s=None,
                             error="Cancelled while it waited in the queue, before it started. Resume puts it in "
                                   "line again.")
    if pid and pid_alive(pid, status.get("pid_started")):
        _kill_group(int(pid), grace_s)  # returns when the job's last thread is gone, and with it the lock
    status = update_status(run_dir, status="cancelled", pid=None, eta_s=None,
                           error=f"Cancelled at step {status.get('step') or 0}. Resume continues from the last "
                                 "checkpoint.")
    if dispatch_next:
        dispatch()  # the machine is free: the next in line starts now, not at some page's next tick
    return status


def _kill_group(pid: int, grace_s: float) -> None:
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    # never signal our own group (a process started without its own session)
    targets = [pid] if pgid == os.getpgid(0) else None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            if targets is None:
                os.killpg(pgid, sig)
            else:
                for t in targets:
                    os.kill(t, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline:
            if not pid_alive(pid) and not _group_alive(pgid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    import psutil

    # members that are only zombies waiting to be reaped count as gone
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


def reconcile() -> list[str]:
    """Mark runs left queued/running by a process that no longer exists as interrupted; return their ids.
    Runs waiting in the queue keep their place (entries of runs deleted or started meanwhile go).

    The app calls this on start, then `dispatch`: after a restart or a crash, those runs are resumable,
    and the queue goes on.
    """
    changed = []
    for run_dir in (r.path for r in all_runs()):
        status = _read_status(run_dir)
        # a queued run without a pid was prepared but never started: it is waiting, not stale
        if _stale(status):
            _mark_interrupted(run_dir, status)
            changed.append(run_dir.name)
    with jobqueue.locked() as queue:  # the queue outlives the app; runs deleted or started meanwhile leave it
        queue[:] = [e for e in queue if _waiting(e)]
    return changed


def list_runs() -> list[dict[str, Any]]:
    """Every run, newest first: id, folder, status, settings and losses, for the app's run list."""
    out = []
    waiting = [e["path"] for e in jobqueue.entries() if _waiting(e)]
    for run in all_runs():
        run_dir = run.path
        status = read_status(run_dir)
        cfg = run.config_values()
        sources = run.sources()
        out.append({
            "id": run_dir.name,
            "path": str(run_dir),
            "status": status.get("status"),
            "error": status.get("error"),
            "created_at": status.get("created_at"),
            "created": run.config_file.stat().st_mtime,
            "step": status.get("step"),
            "max_steps": status.get("max_steps"),
            "first_eval_loss": status.get("first_eval_loss"),
            "eval_loss": status.get("eval_loss"),
            "train_loss": status.get("train_loss"),
            "adapter": status.get("adapter"),
            "has_result": has_result(status),
            "base_model": cfg.get("base_model"),
            "method": cfg.get("method"),
            "quantization": cfg.get("quantization"),
            "preset": cfg.get("preset"),
            "learning_rate": cfg.get("learning_rate"),
            "train_examples": (sources.get("train.jsonl") or {}).get("examples"),
            "resumable": status.get("status") in ("interrupted", "failed", "cancelled"),
            "owner": run.owner(),  # who may see it: tuner.auth.sees_run
            # 1 = next to start; None when it does not wait (a run prepared but never submitted is 'queued' too)
            "queue_position": waiting.index(str(run_dir)) + 1 if str(run_dir) in waiting else None,
        })
    out.sort(key=lambda r: (r["created"], r["id"]), reverse=True)
    return out


def delete_run(run_id: str) -> None:
    """Delete a run folder and everything in it (data copy, checkpoints, adapter, logs); cancel it first if active."""
    run_dir = runs_dir() / check_run_id(run_id)
    if not run_dir.is_dir():
        raise RunNotFound(f"No run named '{run_id}' in {runs_dir()}.")
    status = _read_status(run_dir)
    if status.get("status") in ACTIVE:
        cancel(run_dir)
    shutil.rmtree(run_dir)


# -- before a run starts ----------------------------------------------------------------------------------


def measured_here(base_model: str) -> dict[str, Any] | None:
    """What the newest finished run of this base model measured on this machine: training tokens/s (median
    of its steps), start-up seconds, evaluation seconds, the voice check's seconds per prompt, and `pace`:
    how much longer its training, evaluations and saving took than the estimate made with its measured speed
    (1.0 when unknown), which the next estimate carries over."""
    for r in list_runs():
        if r.get("status") != "completed" or r.get("base_model") != base_model:
            continue
        metrics = read_metrics(Path(r["path"]))
        speeds = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
        if not speeds:
            continue
        status = read_status(Path(r["path"]))
        voice = status.get("voice") or {}
        asked = (voice.get("tuned") or {}).get("prompts")
        checks = [c for c in status.get("voice_checks") or [] if c.get("prompts") and c.get("seconds")]
        found = {"speed": sorted(speeds)[len(speeds) // 2], "startup_s": status.get("startup_s"),
                 "eval_s": status.get("eval_s"), "run": r["id"],
                 "eval_each_s": (status.get("eval_s") or 0.0) / max(sum(m.get("eval_loss") is not None
                                                                         for m in metrics), 1) or None,
                 "voice_s_per_prompt": status["voice_s"] / asked if asked and status.get("voice_s") else None,
                 # did its final check decode the base's replies, or take them from the cache (tuner.replycache)
                 "voice_base": (voice.get("timing") or {}).get("base_replies"),
                 "validation": _digest(Run(Path(r["path"])).data_file("validation.jsonl")),
                 # the checks during training (the result alone answering a few prompts), seconds per prompt
                 "check_s_per_prompt": sum(c["seconds"] for c in checks) / sum(c["prompts"] for c in checks)
                 if checks else None, "checks_s": sum(c["seconds"] for c in checks)}
        found["pace"] = _pace(Run(Path(r["path"])), status, found)
        return found
    return None


def _digest(path: Path) -> str | None:
    """A fingerprint of a data file (the validation split: the same one means the same voice-check prompts)."""
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _pace(run: Run, status: dict[str, Any], found: dict[str, Any]) -> float:
    """The finished run's real time for training, evaluations and saving (its total less start-up and voice
    check) over what `phases` predicts for it at its measured speed; 1.0 for runs that did not record it."""
    total = status.get("total_s")
    if not total:
        return 1.0
    try:
        cfg = run.config()
    except (TunerError, OSError):
        return 1.0
    shape = data_shape(run.data_dir, cfg)
    if not shape["n_train"]:
        return 1.0
    predicted = phases(cfg, shape, found["speed"])  # its checks during training are its own measurement
    middle = predicted["train_s"] + predicted["eval_s"] + predicted["save_s"]
    actual = total - (status.get("startup_s") or 0.0) - (status.get("voice_s") or 0.0) - found["checks_s"]
    return min(max(actual / middle, PACE_BOUNDS[0]), PACE_BOUNDS[1]) if middle > 0 and actual > 0 else 1.0


def voice_s_per_prompt(base_model: str, dev: str, here: dict[str, Any] | None = None,
                       probe: dict[str, Any] | None = None) -> float:
    """Seconds the final voice check takes per held-out prompt with the result and the base both answering:
    this machine's newest run of the model (`here`, from measured_here; a run that took the base's replies
    from the cache is scaled back up), else this CPU's precision probe (`probe`), else the reference, which
    grows with the model's size (the reference is the default model's)."""
    if (here or {}).get("voice_s_per_prompt"):
        per = here["voice_s_per_prompt"]
        return per / CHECK_SHARE if here.get("voice_base") == "cached" else per
    from tuner.models import is_default, model_info

    info = model_info(base_model) if is_default(base_model) or Path(base_model).is_dir() else {}
    if dev == "cpu" and probe and probe.get("fp32_ms"):  # the check decodes in fp32 on a CPU (serving_dtype)
        return VOICE_S_PER_PROBE_MS * probe["fp32_ms"] * _layers(info) / REFERENCE_LAYERS
    scale = int(info["parameters"]) / model_info("default")["parameters"] if info.get("parameters") else 1.0
    return VOICE_S_PER_PROMPT.get(dev, VOICE_S_PER_PROMPT["cpu"]) * scale


def final_check_s(base_model: str, dev: str, here: dict[str, Any] | None, probe: dict[str, Any] | None,
                  data_dir: str | Path, asked: int) -> float:
    """The final voice check's seconds for `asked` prompts of the data in `data_dir`: the result alone answers
    when an earlier finished run here asked the same base the same validation prompts (its replies are cached),
    else the result and the base."""
    both = voice_s_per_prompt(base_model, dev, here, probe)
    cached = bool(here and here.get("validation") and here["validation"] == _digest(Path(data_dir) / "validation.jsonl"))
    return asked * both * (CHECK_SHARE if cached else 1.0)


def _layers(info: dict[str, Any]) -> int:
    try:
        config = json.loads((Path(info["path"]) / "config.json").read_text())
        return int(config.get("num_hidden_layers") or REFERENCE_LAYERS)
    except (KeyError, OSError, TypeError, ValueError):
        return REFERENCE_LAYERS


def reference_speed(base_model: str, dev: str, probe: dict[str, Any] | None) -> float | None:
    """Training tokens/s before any run finished here: from this CPU's precision probe (a LoRA step of one
    decoder layer, times the model's layers), else the converter's reference scaled by model size."""
    from tuner.dataset import CPU_TOKENS_PER_S, GPU_TOKENS_PER_S
    from tuner.models import is_default, model_info

    info = model_info(base_model) if is_default(base_model) or Path(base_model).is_dir() else {}
    params = int(info.get("parameters") or 0)
    if not params:
        return None
    if dev == "cpu" and probe and probe.get(f"{probe.get('choice')}_ms"):
        return PROBE_TOKEN_MS / (probe[f"{probe['choice']}_ms"] * _layers(info))
    return (GPU_TOKENS_PER_S if dev == "cuda" else CPU_TOKENS_PER_S) * model_info("default")["parameters"] / params


def has_habit(data_dir: str | Path) -> bool:
    """Whether the training replies share a habit (a sign-off, a phrase), which makes the run check its voice
    at evaluations during training (tuner.train.voicecheck.VoiceCheck) as well as at the end."""
    from tuner.messages import read_examples
    from tuner.voice import habit_of

    try:
        rows = read_examples(Path(data_dir) / "train.jsonl")
    except (TunerError, OSError):
        return False
    return habit_of([m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]) is not None


def measured_speed(base_model: str) -> float | None:
    """Training tokens/s of the newest finished run of this base model on this machine (a real measurement)."""
    found = measured_here(base_model)
    return found["speed"] if found else None


STARTUP_S = 20.0  # process start, model load, tokenization: a first run's reference (then measured)
SAVE_S = 3.0  # save the adapter, reload it and compare (small for LoRA)
PACE_BOUNDS = (0.5, 4.0)  # a finished run's pace is trusted within these (a run on a busy machine is not the norm)
# the final voice check per held-out prompt, result and base both answering (greedy, batches of 8), with the
# perplexity check spread over them: a first run's reference (then measured); AMD EPYC 2 cores, SmolLM2-135M
VOICE_S_PER_PROMPT = {"cpu": 2.0, "cuda": 0.3}
# a CPU's references from its precision probe (tuner.precision: one decoder layer's LoRA step), the default
# model's layers: training tokens/s x the probe's step ms x layers (Intel Xeon AMX, bf16: 353 x 26.9 x 30 =
# 285k; Intel Xeon AVX-512 without bf16, fp32: 112 x 72.6 x 30 = 244k; the lower kept), and the final check's
# seconds per prompt per fp32 probe ms (AVX-512 Xeon: 57.9 s / 8 prompts / 72.6 ms = 0.10; AMX: 0.084)
PROBE_TOKEN_MS, VOICE_S_PER_PROBE_MS, REFERENCE_LAYERS = 240_000.0, 0.1, 30
# a check in which the result alone answers (the checks during training; the final one when the base's
# replies are cached) takes about this share of one in which the base answers too: 34.1 of 57.9 s and
# 32.4 of 52.4 s (Intel Xeon AVX-512, 8 prompts, the shipped sample)
CHECK_SHARE = 0.6
# the voice benchmark (bench/VOICE.md: 400 public chats whose replies end with one sign-off, 24 new questions,
# as the CPU playground serves it): 96 examples seen (quick) carried the habit to 0 of 24, 192 to 24 of 24
VOICE_MIN_EXAMPLES, VOICE_SHORT, VOICE_ENOUGH = 192, (96, 0), (192, 24)


def reach(examples_seen: int) -> str:
    """What a run that sees this many examples can be expected to reach, before it starts ("" when enough)."""
    if examples_seen >= VOICE_MIN_EXAMPLES:
        return ""
    return (f"{examples_seen:,} examples are too few to expect your agents' habits on new questions: on the voice "
            f"benchmark (400 public chats whose replies end with one sign-off) {VOICE_SHORT[0]} examples carried it to "
            f"{VOICE_SHORT[1]} of 24 new questions, {VOICE_ENOUGH[0]} to {VOICE_ENOUGH[1]} of 24. Good for a first "
            f"look at the pipeline; the *standard* preset learns the voice.")


def data_shape(data_dir: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    """What the estimate needs of the data: training and validation examples, and tokens per example (capped
    at max_length), from the converter's report.json."""
    report = read_json_object(Path(data_dir) / "report.json")
    stats = report.get("stats") or {}
    mean = min((stats.get("tokens") or {}).get("total", 0) / max(stats.get("examples") or 1, 1), cfg.max_length)
    return {"n_train": int(report.get("train_examples") or 0), "n_val": int(report.get("validation_examples") or 0),
            "mean_tokens": mean}


def phases(cfg: TrainConfig, shape: dict[str, Any], speed: float) -> dict[str, float]:
    """Seconds of training steps, evaluations and saving for `cfg` on data of `shape` at `speed` tokens/s.

    Evaluations: a seeded sample before training, at most eval_share of the training time during it, and
    every validation example once at the end (OverheadBudget in tuner.train.callbacks); an evaluation runs
    forward only, about a third of a training step's cost per token."""
    n_val, mean_tokens = shape["n_val"], shape["mean_tokens"]
    steps = cfg.planned_steps(shape["n_train"])
    train_s = steps * cfg.batch_size * cfg.grad_accum * mean_tokens / speed
    sample = min(n_val, cfg.eval_examples) if cfg.eval_examples else n_val
    eval_s = 0.0
    if n_val:
        start_and_end = (sample + (n_val if n_val > sample else 0)) * mean_tokens / (3 * speed)
        eval_s = start_and_end + min(cfg.eval_share * train_s, steps // cfg.eval_steps * sample * mean_tokens
                                     / (3 * speed))
    return {"train_s": train_s, "eval_s": eval_s, "save_s": SAVE_S}


def eval_allowed(eval_s: float, last_eval_s: float, spent_s: float, eval_share: float) -> bool:
    """OverheadBudget's rule (and the estimate's, tuner.jobs.voice_checks): a due evaluation runs unless the
    evaluations so far plus one as long as the last would exceed `eval_share` of the time so far."""
    return eval_share >= 1.0 or eval_s + last_eval_s <= eval_share * (spent_s + last_eval_s)


def voice_checks(cfg: TrainConfig, shape: dict[str, Any], speed: float, check_s: float,
                 eval_s: float | None = None) -> int:
    """How many evaluations during a run of `cfg` will also check the voice (a check costs `check_s`): each
    due one (every eval_steps) that OverheadBudget lets through, simulated with the same rule (skipped while
    the evaluations so far plus the last one's length would exceed eval_share of the time so far; the budget
    learns a check's cost only after the first one), and then the last step's, which VoiceCheck skips when
    no evaluation came before it (nothing to choose between). `eval_s`: one evaluation's seconds, if measured."""
    steps = cfg.planned_steps(shape["n_train"])
    if not steps:
        return 0
    step_s = cfg.batch_size * cfg.grad_accum * shape["mean_tokens"] / speed
    sample = min(shape["n_val"], cfg.eval_examples) if cfg.eval_examples else shape["n_val"]
    eval_cost = eval_s or sample * shape["mean_tokens"] / (3 * speed)  # one evaluation: measured, or forward passes
    spent = eval_s = last = eval_cost  # the evaluation at the start, without a check
    checks = 0
    for step in range(1, steps):
        spent += step_s
        if step % cfg.eval_steps == 0 and eval_allowed(eval_s, last, spent, cfg.eval_share):
            last = eval_cost + check_s
            spent += last
            eval_s += last
            checks += 1
    return checks + 1 if checks else 0


def estimate(cfg: TrainConfig, data_dir: str | Path, time_only: bool = False) -> dict[str, Any]:
    """Steps, time and peak memory of a run before it starts, counting what the user waits for.
    `time_only`: leave out memory and precision (they may measure this CPU first, which the queue, that
    only needs the time, must not wait for; `memory_mb` and `precision` are None then).

    Time = start-up + training steps + evaluations + saving + the voice check (after the save). With a
    finished run of the same model on this machine, each part is learned from it: its start-up, its speed,
    its pace (how its training, evaluations and saving compared with the estimate at that speed) and its
    voice check's seconds per prompt; else reference figures (the converter's speeds for the default model,
    scaled by model size), and the uncertainty says which.
    """
    from tuner.models import EAGER_MAX_SCORE_BYTES, attention_score_bytes, device, is_default, model_info

    shape = data_shape(data_dir, cfg)
    n_train, n_val, mean_tokens = shape["n_train"], shape["n_val"], shape["mean_tokens"]
    per_step = cfg.batch_size * cfg.grad_accum
    steps = cfg.planned_steps(n_train)
    train_tokens = steps * per_step * mean_tokens
    dev = device()
    info = model_info(cfg.base_model) if is_default(cfg.base_model) or Path(cfg.base_model).is_dir() else {}
    params = int(info.get("parameters") or 0)
    here = measured_here(cfg.base_model)
    probe = None
    if dev == "cpu" and not here:  # this CPU's probe (measured once, cached; the queue only reads the cache)
        from tuner.precision import for_model

        with contextlib.suppress(Exception):
            probe = for_model(cfg.base_model, measure=not time_only)
    speed = here["speed"] if here else reference_speed(cfg.base_model, dev, probe)
    seconds, breakdown = None, None
    if speed:
        pace = (here or {}).get("pace") or 1.0
        parts = {k: round(v * pace, 1) for k, v in phases(cfg, shape, speed).items()}
        startup = (here or {}).get("startup_s") or STARTUP_S
        asked = min(cfg.voice_prompts, n_val)  # held-out prompts: at most one per validation conversation
        both = voice_s_per_prompt(cfg.base_model, dev, here, probe)
        from tuner.verdict import CHECK_PROMPTS

        check = min(CHECK_PROMPTS, asked) * ((here or {}).get("check_s_per_prompt") or both * CHECK_SHARE)
        checks = (voice_checks(cfg, shape, speed / pace, check, (here or {}).get("eval_each_s"))
                  if asked and has_habit(data_dir) else 0)
        breakdown = {"startup_s": round(startup, 1), **parts, "checks_s": round(checks * check, 1),
                     "voice_s": round(final_check_s(cfg.base_model, dev, here, probe, data_dir, asked), 1)}
        seconds = round(sum(breakdown.values()), 1)
    memory_mb = None
    if params and not time_only:
        config = json.loads((Path(info["path"]) / "config.json").read_text())
        hidden, layers = config.get("hidden_size", 0), config.get("num_hidden_layers", 0)
        heads = config.get("num_attention_heads", 1)
        # 4-bit NF4 with its scales, else the dtype the run keeps the base in (bf16, or fp32 where it is faster)
        weight_bytes = 0.56 if cfg.uses_nf4() else 2 if cfg.precision_choice(dev) in ("bf16", "fp16") else 4
        seq = min(cfg.max_length, max(mean_tokens, 1) * 2)  # batches group similar lengths; allow the long tail
        activations = cfg.batch_size * seq * layers * hidden * 20 * 2
        # the LM head works in tiles (CPU: tuner.train.trainer.CPU_TILES, fp32, ~8 temporaries); eager attention
        # on a CPU keeps every layer's scores for the backward pass (~6 bytes each; tuner.train.recipe.attention)
        head = 512 * 8192 * 4 * 8
        longest = min(cfg.max_length, max(mean_tokens, 1) * 2)
        scores = attention_score_bytes(cfg.batch_size, heads, layers, longest)
        eager = dev == "cpu" and scores <= EAGER_MAX_SCORE_BYTES
        # framework: torch, tokenizer, datasets, the Trainer (CPU: RSS; the quick preset's first step on
        # 8 x 512-token examples measured 5.1 GB, AMD EPYC, 2 cores); CUDA: the context
        overhead = 2000 * 2**20 if dev == "cpu" else 400 * 2**20
        memory_mb = (params * weight_bytes + activations + head + (scores if eager else 0) + overhead) / 2**20
    if dev == "cuda" and not time_only:  # a GPU: the formula the run is refused by (docs/memory.md): one number
        from tuner import memory

        shape = memory.shape_of(cfg.base_model)
        memory_mb = memory.plan(shape, cfg)["total_gib"] * 1024 if shape is not None else memory_mb
    if here:
        from tuner import auth

        # with sign-in on, the run may be another team's: the estimate learns from it but does not name it
        which = f" ({here['run']})" if auth.mode() == "none" else ""
        uncertainty = (f"Learned from this machine's last finished run of this model{which}: runs pressed one "
                       "after another came within 25% of it (bench/README.md); other data and a busy machine can "
                       "be further off.")
    elif probe:
        uncertainty = ("No run of this model has finished on this machine yet, so this scales reference speeds "
                       "by this CPU's measured precision probe: it may be off by 2x either way; the first run "
                       "measures this machine.")
    else:
        uncertainty = ("No run of this model has finished on this machine yet, so this uses reference speeds: "
                       "it may be off by 2x either way; the first run measures this machine.")
    precision = None
    if dev == "cpu" and not time_only:
        from tuner.precision import describe, for_model

        precision = describe(for_model(cfg.base_model)) if cfg.precision == "auto" else cfg.precision
    return {"steps": steps, "examples": n_train, "tokens": round(train_tokens), "time_s": seconds,
            "reach": reach(steps * per_step),
            "breakdown": breakdown, "memory_mb": memory_mb, "device": "GPU" if dev == "cuda" else "CPU",
            "pace": (here or {}).get("pace"),
            "speed": speed, "measured": here is not None, "uncertainty": uncertainty, "precision": precision,
            # where the speeds came from: this machine's last run, this CPU's precision probe, or the references
            "source": "run" if here else "probe" if probe else "reference"}
